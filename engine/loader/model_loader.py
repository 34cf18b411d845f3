"""Load a model from a Hugging Face folder or a GGUF file into config, weights and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from engine.config import ModelConfig
from engine.errors import InvalidInputError, LaminaError, ModelLoadError
from engine.loader import repack_cache
from engine.loader.checkpoint import load_checkpoint_weights
from engine.loader.default_model import default_model_path
from engine.loader.gguf_file import gguf_metadata, open_gguf
from engine.loader.tensor_source import GGUF_ROPE_TENSORS, GGUFSource, SafetensorsSource
from engine.loader.tokenizer import Tokenizer, load_hf_tokenizer, tokenizer_from_gguf
from engine.loader.weights_builder import build_weights
from engine.quant.formats import Quantizer, WeightPlan
from engine.sampling import SamplingParams
from engine.weights import ModelWeights, has_blocks

# generation_config.json fields that become SamplingParams defaults.
_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "do_sample")


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    # The lamina checkpoint folder the weights are memory-mapped from (None: loaded into RAM)
    checkpoint: Path | None = None
    # How the weights were made, for --verbose: "GGUF blocks repacked (cached at ...)"
    note: str = ""


def load_model(
    model: str | Path | None = None, quant: str | None = None, plan: WeightPlan | None = None
) -> LoadedModel:
    """Load `model` (a folder, a .gguf file, or None for the default model).

    quant: None runs a GGUF in its own quantization (its block types, as llama.cpp does) and
    a float checkpoint in float32; "f32", "int8" or "int4" converts each matrix as it loads.
    `plan` (instead of quant) chooses per matrix, as `lamina quantize --layer-weights` does.
    A missing, corrupt or inconsistent model raises a LaminaError (ModelLoadError or
    UnsupportedModelError) with a one-line message that names the file.
    """
    plan = plan or WeightPlan(quant)
    quant = plan.default if not plan.overrides else "mixed"
    quantize = plan.quantizer()
    start = time.perf_counter()
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path} is neither a file nor a folder")
    with _naming(path):
        if path.is_dir():
            loaded = _load_hf_folder(path, quant, quantize, plan.unties())
        elif _is_gguf(path):
            loaded = _load_gguf(path, quantize, quant is None, plan.unties())
        else:
            raise ModelLoadError(f"{path} is neither a Hugging Face model folder nor a GGUF file")
    plan.check_layers(loaded.config.num_layers)
    loaded.load_s = time.perf_counter() - start
    return loaded


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Make every LaminaError raised while loading `path` a single line that names it.

    The parsers deep inside (config fields, tokenizer metadata, tensor shapes) know which key
    or tensor is wrong, but not which file the user gave; the CLI prints one line.
    """
    try:
        yield
    except LaminaError as exc:
        message = " ".join(str(exc).splitlines())
        if str(path) not in message:
            message = f"{path}: {message}"
        exc.args = (message,)
        raise


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _load_hf_folder(
    folder: Path, quant: str | None, quantize: Quantizer | None, untie: bool = False
) -> LoadedModel:
    """A Hugging Face folder, or a lamina checkpoint (an HF folder with fused, typed tensors)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    raw_config = _read_json(config_path)
    config = ModelConfig.from_hf(raw_config)
    checkpoint = raw_config.get("lamina")
    if checkpoint is not None:
        stored = checkpoint.get("weights") if isinstance(checkpoint, dict) else None
        if quant not in (None, stored):
            raise ModelLoadError(
                f"{folder} is a lamina checkpoint with {stored} weights; it cannot be loaded as {quant}"
            )
    tokenizer = load_hf_tokenizer(folder)
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    eos = _merge_ids(
        config.eos_token_ids, _ids(gen.get("eos_token_id"), gen_path), tokenizer.eos_token_ids
    )
    config = dataclasses.replace(config, eos_token_ids=eos)
    if checkpoint is not None:
        weights = load_checkpoint_weights(folder, config.num_layers)
    else:
        source = SafetensorsSource(folder)
        weights = build_weights(config, source, str(folder), quantize, untie=untie)
    defaults = _sampling_defaults(gen, gen_path)
    mapped_from = folder if checkpoint is not None else None
    return LoadedModel(folder, config, weights, tokenizer, defaults, checkpoint=mapped_from)


def _sampling_defaults(gen: dict[str, Any], gen_path: Path) -> dict[str, Any]:
    """generation_config.json's sampling fields, checked as SamplingParams checks a request's:
    a bad value there would otherwise fail every request that relies on the defaults."""
    defaults = {k: gen[k] for k in _SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    try:
        SamplingParams().with_defaults(defaults)
    except InvalidInputError as exc:
        raise ModelLoadError(f"{gen_path}: {exc}") from None
    return defaults


def _load_gguf(
    path: Path, quantize: Quantizer | None, native: bool, untie: bool = False
) -> LoadedModel:
    reader = open_gguf(path)
    meta = gguf_metadata(reader, path)
    config = ModelConfig.from_gguf(meta, _rope_tensors(reader))
    arch = meta["general.architecture"]
    source = GGUFSource(
        path,
        reader,
        config.num_heads,
        config.num_kv_heads,
        permute_qk=arch in ("llama", "mistral"),
        sandwich_norms=config.sandwich_norms,
    )
    tokenizer = tokenizer_from_gguf(meta)
    # The parsed metadata (a vocabulary's worth of small arrays, ~70 MB) is no longer needed
    # while the weights load: peak memory then stays near the weights' size.
    del meta
    reader.fields.clear()
    eos = _merge_ids(config.eos_token_ids, tokenizer.eos_token_ids)
    config = dataclasses.replace(
        config, tie_word_embeddings=not source.has("lm_head.weight"), eos_token_ids=eos
    )
    note = ""
    weights = None
    if native and repack_cache.enabled():
        weights, note = repack_cache.load(path, config.num_layers)
    if weights is None:
        weights = build_weights(config, source, str(path), quantize, native, untie)
        if native and repack_cache.enabled() and has_blocks(weights):
            note = "; ".join(filter(None, [note, repack_cache.store(path, weights)]))
    return LoadedModel(path, config, weights, tokenizer, {}, note=note)


def _rope_tensors(reader: Any) -> dict[str, np.ndarray]:
    """Rope scaling as a GGUF stores it, by the RopeConfig field each tensor fills: llama3's
    per-frequency divisors (rope_freqs.weight), LongRoPE's factors (rope_factors_*.weight)."""
    found = {}
    for tensor in reader.tensors:
        if tensor.name in GGUF_ROPE_TENSORS:
            if tensor.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                raise ModelLoadError(
                    f"tensor {tensor.name!r} has type {tensor.tensor_type.name}; "
                    "llama.cpp writes it as F32"
                )
            values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
            found[GGUF_ROPE_TENSORS[tensor.name]] = values
    return found


def _ids(value: Any, where: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelLoadError(
            f"{where}: eos_token_id must be a token id or a list of them, got {value!r}"
        )
    return tuple(values)


def _merge_ids(*groups: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for group in groups:
        for i in group:
            seen[int(i)] = None
    return tuple(seen)
