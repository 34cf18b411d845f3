"""Loading a corrupt model ends in a clean load or a LaminaError, never in another exception.

Hypothesis mutates bytes in each region of a tiny GGUF (header, metadata, the tokenizer arrays,
tensor infos, tensor data), the text and the values of a tiny Hugging Face folder's
config.json, and the header of its model.safetensors (the 8-byte length and the JSON). Every
error must be a LaminaError whose one-line message names the file or folder. The outcomes are
tallied per target and printed at the end of the module ("fuzz counts"), so a run shows how
many mutants were refused and how many still loaded.

Examples are derandomized, so CI runs the same mutants every time.
"""

from __future__ import annotations

import collections
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from engine.errors import LaminaError, ModelLoadError
from engine.loader.model_loader import load_model

HIDDEN, FFN, HEADS, KV_HEADS, CONTEXT = 32, 64, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE = "in the tin, a hat <|im_end|>"
GGUF_REGIONS = (
    "header",
    "metadata",
    "tokens",
    "token_type",
    "merges",
    "metadata_tail",
    "tensor_info",
    "tensor_data",
)

# (target, region) -> outcome -> count, printed when the module ends.
OUTCOMES: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)

BYTE_EDITS = st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=4)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 300)
    | st.floats()
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=4,
)
DELETE = object()


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (the byte-level vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(
    path: Path, merges: list[str] = MERGES, block_type: Callable[[str], str] = lambda _: "Q8_0"
) -> Path:
    """A one-layer llama GGUF with a byte-level BPE tokenizer, F16/F32 tensors and the layer's
    matrices in `block_type(their GGUF name)` (Q8_0; any type gguf can quantise) (~60 KB)."""
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(1)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN).astype(np.float16))
    w.add_tensor("output_norm.weight", weight(HIDDEN) + 1)
    w.add_tensor("blk.0.attn_norm.weight", weight(HIDDEN) + 1)
    w.add_tensor("blk.0.ffn_norm.weight", weight(HIDDEN) + 1)
    kv = KV_HEADS * HEAD_DIM
    for name, shape in [
        ("attn_q", (HIDDEN, HIDDEN)),
        ("attn_k", (kv, HIDDEN)),
        ("attn_v", (kv, HIDDEN)),
        ("attn_output", (HIDDEN, HIDDEN)),
        ("ffn_gate", (FFN, HIDDEN)),
        ("ffn_up", (FFN, HIDDEN)),
        ("ffn_down", (HIDDEN, FFN)),
    ]:
        kind = gguf.GGMLQuantizationType[block_type(name)]
        blocks = gguf.quants.quantize(weight(*shape), kind)
        w.add_tensor(f"blk.0.{name}.weight", blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class TinyGGUF:
    path: Path
    data: bytes
    regions: dict[str, tuple[int, int]]


def gguf_regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of the file's parts, found with the gguf package's reader."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    first_tensor = min(t.field.offset for t in reader.tensors)
    after_merges = min(
        (f.offset for f in fields.values() if f.offset > fields["tokenizer.ggml.merges"].offset),
        default=first_tensor,
    )
    return {
        "header": (0, 24),
        "metadata": (24, fields["tokenizer.ggml.tokens"].offset),
        "tokens": (
            fields["tokenizer.ggml.tokens"].offset,
            fields["tokenizer.ggml.token_type"].offset,
        ),
        "token_type": (
            fields["tokenizer.ggml.token_type"].offset,
            fields["tokenizer.ggml.merges"].offset,
        ),
        "merges": (fields["tokenizer.ggml.merges"].offset, after_merges),
        "metadata_tail": (after_merges, first_tensor),
        "tensor_info": (first_tensor, reader.data_offset),
        "tensor_data": (reader.data_offset, path.stat().st_size),
    }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> TinyGGUF:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return TinyGGUF(path, path.read_bytes(), gguf_regions(path))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_gguf) -> Path:
    """The same tiny model as a Hugging Face folder (config written by transformers)."""
    import transformers

    folder = tmp_path_factory.mktemp("hf")
    loaded = load_model(tiny_gguf.path, "f32")  # float arrays to write back
    loaded.tokenizer.save(folder)
    config = transformers.LlamaConfig(
        vocab_size=loaded.config.vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    w = loaded.weights
    layer = w.layers[0]
    qkv = np.split(layer.qkv.data, [HIDDEN, HIDDEN + KV_HEADS * HEAD_DIM])
    gate, up = np.split(layer.gate_up.data, 2)
    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": w.embed.data,
        "model.norm.weight": w.final_norm,
        p + "input_layernorm.weight": layer.attn_norm,
        p + "post_attention_layernorm.weight": layer.ffn_norm,
        p + "self_attn.q_proj.weight": qkv[0],
        p + "self_attn.k_proj.weight": qkv[1],
        p + "self_attn.v_proj.weight": qkv[2],
        p + "self_attn.o_proj.weight": layer.o_proj.data,
        p + "mlp.gate_proj.weight": gate,
        p + "mlp.up_proj.weight": up,
        p + "mlp.down_proj.weight": layer.down.data,
    }
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        folder / "model.safetensors",
        {"format": "pt"},
    )
    return folder


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Where mutants are written (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("mutants")


@pytest.fixture(scope="module", autouse=True)
def report_fuzz_counts(request) -> Iterator[None]:
    """Print the outcome counts past pytest's output capture once the module is done."""
    yield
    if not OUTCOMES:
        return
    lines = ["", "fuzz counts (target / region: outcome = count):"]
    totals: collections.Counter[str] = collections.Counter()
    for (target, region), counts in sorted(OUTCOMES.items()):
        totals.update(counts)
        lines.append(
            f"  {target} / {region}: " + ", ".join(f"{k} = {v}" for k, v in sorted(counts.items()))
        )
    shown = ", ".join(f"{k} = {v}" for k, v in sorted(totals.items()))
    lines.append(f"  all {sum(totals.values())} examples: {shown}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))


def load_outcome(path: Path) -> str:
    """'clean load' or the LaminaError's class name; any other exception fails the test."""
    try:
        loaded = load_model(path)
    except LaminaError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert str(path) in message, message
        return type(exc).__name__
    loaded.tokenizer.decode(loaded.tokenizer.encode(SAMPLE))  # a loaded tokenizer works
    return "clean load"


def apply_edits(data: bytes, lo: int, hi: int, edits: list[tuple[int, int]]) -> bytes:
    mutated = bytearray(data)
    for where, value in edits:
        mutated[lo + where % (hi - lo)] = value
    return bytes(mutated)


@contextmanager
def mutant_folder(folder: Path, scratch: Path, name: str, content: bytes) -> Iterator[Path]:
    """A copy of `folder` whose file `name` holds `content`."""
    copy = scratch / "hf"
    if not copy.exists():
        shutil.copytree(folder, copy)
    (copy / name).write_bytes(content)
    try:
        yield copy
    finally:
        shutil.copyfile(folder / name, copy / name)


# --------------------------------------------------------------------------------------------
# GGUF


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(region=st.sampled_from(GGUF_REGIONS), edits=BYTE_EDITS)
def test_mutated_gguf_loads_or_raises_lamina_error(tiny_gguf, scratch, region, edits):
    path = scratch / "mutant.gguf"
    path.write_bytes(apply_edits(tiny_gguf.data, *tiny_gguf.regions[region], edits))
    OUTCOMES["gguf", region][load_outcome(path)] += 1


def test_unmutated_tiny_models_load(tiny_gguf, tiny_folder):
    assert load_outcome(tiny_gguf.path) == "clean load"
    assert load_outcome(tiny_folder) == "clean load"


def test_merge_of_a_token_outside_the_vocabulary(tmp_path):
    """tokenizers raised its own exception (or a Rust panic when only the merged token is
    unknown); it is a ModelLoadError naming the file and the merge."""
    for merges in (MERGES + ["Ġ zz"], MERGES + ["h in"]):
        path = write_tiny_gguf(tmp_path / "bad_merge.gguf", merges)
        with pytest.raises(ModelLoadError, match=r"bad_merge\.gguf.*merge 5"):
            load_model(path)


def test_token_that_is_not_utf8(tiny_gguf, tmp_path):
    start = tiny_gguf.data.index(b"<|im_end|>")
    path = tmp_path / "bad_text.gguf"
    path.write_bytes(apply_edits(tiny_gguf.data, start, start + 1, [(0, 0xFF)]))
    with pytest.raises(ModelLoadError, match=r"bad_text\.gguf.*'tokenizer\.ggml\.tokens'.*UTF-8"):
        load_model(path)


def test_huge_array_count_is_refused_without_reading_on(tiny_gguf, tmp_path):
    """The reader would walk the rest of the file one int32 at a time, then loop forever."""
    start = tiny_gguf.regions["token_type"][0]
    key = b"tokenizer.ggml.token_type"
    count_at = start + 8 + len(key) + 4 + 4  # key length, key, value type, element type
    data = bytearray(tiny_gguf.data)
    data[count_at : count_at + 8] = struct.pack("<Q", 2**62)
    path = tmp_path / "huge.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=r"huge\.gguf is truncated or corrupt.*token_type"):
        load_model(path)


# --------------------------------------------------------------------------------------------
# config.json

CONFIG_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_parameters/rope_type",
    "rope_parameters/rope_theta",
    "rope_parameters/factor",
    "rope_parameters/low_freq_factor",
    "rope_parameters/original_max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
    "lamina_rope_freq_factors",
    "lamina",
)
CONFIG_CHANGES = st.lists(
    st.tuples(st.sampled_from(CONFIG_KEYS), st.just(DELETE) | JSON_VALUES),
    min_size=1,
    max_size=3,
)


def change_config(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, name = key.split("/")
    for parent in parents:
        if not isinstance(config.get(parent), dict):
            config[parent] = {}
        config = config[parent]
    if value is DELETE:
        config.pop(name, None)
    else:
        config[name] = value


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(edits=BYTE_EDITS)
def test_mutated_config_text_loads_or_raises_lamina_error(tiny_folder, scratch, edits):
    text = (tiny_folder / "config.json").read_bytes()
    with mutant_folder(
        tiny_folder, scratch, "config.json", apply_edits(text, 0, len(text), edits)
    ) as m:
        OUTCOMES["config.json", "text bytes"][load_outcome(m)] += 1


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(changes=CONFIG_CHANGES)
def test_mutated_config_values_load_or_raise_lamina_error(tiny_folder, scratch, changes):
    config = json.loads((tiny_folder / "config.json").read_text())
    for key, value in changes:
        change_config(config, key, value)
    with mutant_folder(tiny_folder, scratch, "config.json", json.dumps(config).encode()) as m:
        OUTCOMES["config.json", "values"][load_outcome(m)] += 1


# --------------------------------------------------------------------------------------------
# safetensors header


def split_safetensors(path: Path) -> tuple[int, dict[str, Any], bytes]:
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data)[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(edits=BYTE_EDITS)
def test_mutated_safetensors_header_bytes(tiny_folder, scratch, edits):
    """Bytes of the 8-byte length and the JSON header; the tensor data is left alone."""
    n, _, _ = split_safetensors(tiny_folder / "model.safetensors")
    data = (tiny_folder / "model.safetensors").read_bytes()
    mutated = apply_edits(data, 0, 8 + n, edits)
    with mutant_folder(tiny_folder, scratch, "model.safetensors", mutated) as m:
        OUTCOMES["model.safetensors", "header bytes"][load_outcome(m)] += 1


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    entry=st.integers(0, 100),
    field=st.sampled_from(("dtype", "shape", "data_offsets", "__metadata__")),
    value=st.just(DELETE)
    | JSON_VALUES
    | st.lists(st.integers(-1, 2**64), max_size=3)
    | st.sampled_from(("F16", "I8", "U8", "F64", "BOOL", "Q4")),
    length=st.none() | st.integers(0, 2**64 - 1),
)
def test_mutated_safetensors_header_values(tiny_folder, scratch, entry, field, value, length):
    """One entry's dtype, shape or data_offsets (or the metadata) replaced, the JSON
    re-serialized, and optionally the length field set to any 64-bit value."""
    _, header, body = split_safetensors(tiny_folder / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    target = header if field == "__metadata__" else header[names[entry % len(names)]]
    change_config(target, field, value)
    text = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(text) if length is None else length)
    with mutant_folder(tiny_folder, scratch, "model.safetensors", prefix + text + body) as m:
        OUTCOMES["model.safetensors", "header values"][load_outcome(m)] += 1
