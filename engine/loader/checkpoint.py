"""lamina's own checkpoint: already-fused, already-quantized weights that load memory-mapped.

Layout of a checkpoint folder:
    config.json             Hugging Face style, plus "lamina": {"format": 1, "weights": ...}
    model.safetensors       tensors under lamina's names (layers.N.qkv.data, .scale, .bias ...)
                            with the header metadata {"lamina.format": "1", "lamina.weights": ...}
    tokenizer.json, tokenizer_config.json, generation_config.json

Loading maps the file once and hands out numpy views into it, so start-up costs no copy and
no quantization, and the outputs are bit-identical to quantizing on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from engine.errors import ModelLoadError
from engine.loader.tensor_source import read_safetensors_header
from engine.weights import (
    LAYER_LINEARS,
    ColskipInt8Weight,
    DenseWeight,
    Int8Weight,
    LayerWeights,
    ModelWeights,
    SparseInt8Weight,
    Weight,
)

FORMAT_VERSION = 1
_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8, "I64": np.int64}


def weights_format(weights: ModelWeights) -> str:
    return "f32" if isinstance(weights.layers[0].qkv, DenseWeight) else "int8"


def save_checkpoint(loaded, out: Path, sparsity: dict | None = None) -> None:
    """Write `loaded` (a LoadedModel) to folder `out`; `sparsity` records how it was pruned."""
    out.mkdir(parents=True, exist_ok=True)
    w = loaded.weights
    fmt = weights_format(w)
    tensors: dict[str, np.ndarray] = {"final_norm": w.final_norm}
    _put(tensors, "embed", w.embed)
    tied = w.lm_head is w.embed
    if not tied:
        _put(tensors, "lm_head", w.lm_head)
    for i, layer in enumerate(w.layers):
        tensors[f"layers.{i}.attn_norm"] = layer.attn_norm
        tensors[f"layers.{i}.ffn_norm"] = layer.ffn_norm
        for name in LAYER_LINEARS:
            _put(tensors, f"layers.{i}.{name}", getattr(layer, name))
    meta = {
        "lamina.format": str(FORMAT_VERSION),
        "lamina.weights": fmt,
        "lamina.tied": str(int(tied)),
    }
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors", meta
    )
    config = loaded.config.to_hf()
    config["tie_word_embeddings"] = tied
    config["lamina"] = {"format": FORMAT_VERSION, "weights": fmt}
    if sparsity:
        config["lamina"]["sparsity"] = sparsity
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": list(loaded.config.eos_token_ids), **loaded.sampling_defaults}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    loaded.tokenizer.save(out)


def _put(tensors: dict[str, np.ndarray], name: str, weight: Weight) -> None:
    """Store a weight under name.<part>; the parts present tell the loader its type."""
    if isinstance(weight, SparseInt8Weight):
        tensors[name + ".mask"] = weight.mask
        tensors[name + ".values"] = weight.values
        tensors[name + ".row_ptr"] = weight.row_ptr
        tensors[name + ".in_features"] = np.array([weight.in_features], dtype=np.int64)
    elif isinstance(weight, ColskipInt8Weight):
        tensors[name + ".data_t"] = weight.data_t
        tensors[name + ".act_threshold"] = np.array([weight.threshold], dtype=np.float32)
    else:
        tensors[name + ".data"] = weight.data
    if not isinstance(weight, DenseWeight):
        tensors[name + ".scale"] = weight.scale
    if weight.bias is not None:
        tensors[name + ".bias"] = weight.bias


def load_checkpoint_weights(folder: Path, num_layers: int) -> ModelWeights:
    """Memory-map model.safetensors of a lamina checkpoint into ModelWeights (no copies)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{folder} is a lamina checkpoint without model.safetensors")
    header, data_start = read_safetensors_header(path)
    meta = header.pop("__metadata__", {}) or {}
    if meta.get("lamina.format") != str(FORMAT_VERSION):
        raise ModelLoadError(
            f"{path} has lamina checkpoint format {meta.get('lamina.format')!r}; "
            f"this lamina reads format {FORMAT_VERSION}"
        )
    # A plain ndarray over the mapping (views of a memmap carry subclass overhead); the mapping
    # stays alive through .base for as long as any weight references it.
    mapped = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    arrays = {name: _view(mapped, data_start, name, info, path) for name, info in header.items()}

    def weight(name: str) -> Weight:
        def part(suffix: str) -> np.ndarray:
            return arrays[name + suffix]

        try:
            bias = arrays.get(name + ".bias")
            if name + ".mask" in arrays:
                k = int(part(".in_features")[0])
                return SparseInt8Weight(
                    part(".mask"), part(".values"), part(".row_ptr"), part(".scale"), k, bias
                )
            if name + ".data_t" in arrays:
                threshold = float(part(".act_threshold")[0])
                return ColskipInt8Weight(part(".data_t"), part(".scale"), threshold, bias)
            if name + ".scale" in arrays:
                return Int8Weight(part(".data"), part(".scale"), bias)
            return DenseWeight(part(".data"), bias)
        except KeyError as exc:
            raise ModelLoadError(f"{path} has no tensor {exc.args[0]!r}") from None

    def vector(name: str) -> np.ndarray:
        if name not in arrays:
            raise ModelLoadError(f"{path} has no tensor {name!r}")
        return arrays[name]

    embed = weight("embed")
    layers = [
        LayerWeights(
            attn_norm=vector(f"layers.{i}.attn_norm"),
            qkv=weight(f"layers.{i}.qkv"),
            o_proj=weight(f"layers.{i}.o_proj"),
            ffn_norm=vector(f"layers.{i}.ffn_norm"),
            gate_up=weight(f"layers.{i}.gate_up"),
            down=weight(f"layers.{i}.down"),
        )
        for i in range(num_layers)
    ]
    lm_head = embed if meta.get("lamina.tied") == "1" else weight("lm_head")
    return ModelWeights(
        embed=embed, layers=layers, final_norm=vector("final_norm"), lm_head=lm_head
    )


def _view(mapped: np.ndarray, start: int, name: str, info: dict, path: Path) -> np.ndarray:
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ModelLoadError(f"tensor {name!r} in {path} has unexpected dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    return mapped[start + lo : start + hi].view(dtype).reshape(info["shape"])
