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

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loader.tensor_source import read_safetensors_header
from engine.weights import (
    BLOCK_ARRAYS,
    LAYER_LINEARS,
    LAYER_NORMS,
    BlockWeight,
    ColskipBlockWeight,
    ColskipInt8Weight,
    DenseWeight,
    ExpertWeights,
    Int8Weight,
    LayerWeights,
    ModelWeights,
    SparseInt8Weight,
    StackedWeight,
    Weight,
)
from kernels_cpu.colskip_blocks import GROUPS as SKIP_GROUPS
from kernels_cpu.colskip_blocks import padded_outputs
from kernels_cpu.matmul_blocks import padded_inputs, padded_width, row_groups
from kernels_cpu.simd_blocks import GROUPS, ROWS, SUPER
from offload.streaming import LayerStream, TensorSpec

FORMAT_VERSION = 1
# The tensor name endings of int8 and f32 layers (Int8Weight, DenseWeight and the norms).
_STREAMABLE_PARTS = {"data", "scale", "bias", *LAYER_NORMS}
_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "I64": np.int64}


def weights_format(weights: ModelWeights) -> str:
    """The precision of the decoder's linears: f32, int8, int4 (lamina's own 4-bit) or the
    GGUF block types a file runs in ("Q4_1", "Q4_K+Q6_K"); several joined by "+"."""
    kinds: dict[str, None] = {}
    for layer in weights.layers:
        for _, weight in layer.linears():
            for part in weight.parts if isinstance(weight, StackedWeight) else [weight]:
                if isinstance(part, DenseWeight):
                    kinds["f32"] = None
                elif isinstance(part, BlockWeight):
                    kinds.update(dict.fromkeys(part.kind.split("+")))
                elif isinstance(part, ColskipBlockWeight):
                    kinds["int4"] = None
                else:
                    kinds["int8"] = None
    names = ["int4" if kind.startswith("int4") else kind for kind in kinds]
    return "+".join(dict.fromkeys(names))


def save_checkpoint(loaded, out: Path, recipe: dict | None = None) -> None:
    """Write `loaded` (a LoadedModel) to folder `out`; `recipe` records how it was made
    (pruning, GPTQ calibration) in config.json's "lamina" entry."""
    out.mkdir(parents=True, exist_ok=True)
    fmt = weights_format(loaded.weights)
    tied = save_weights_file(loaded.weights, out / "model.safetensors")
    config = loaded.config.to_hf()
    config["tie_word_embeddings"] = tied
    config["lamina"] = {"format": FORMAT_VERSION, "weights": fmt}
    config["lamina"].update(recipe or {})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": list(loaded.config.eos_token_ids), **loaded.sampling_defaults}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    loaded.tokenizer.save(out)


def save_weights_file(w: ModelWeights, path: Path) -> bool:
    """Write the weights to one safetensors file as checkpoints hold them; whether the
    output head is the embedding (tied)."""
    tensors: dict[str, np.ndarray] = {"final_norm": w.final_norm}
    _put(tensors, "embed", w.embed)
    tied = w.lm_head is w.embed
    if not tied:
        _put(tensors, "lm_head", w.lm_head)
    for i, layer in enumerate(w.layers):
        tensors.update(layer_arrays(layer, i))
    meta = {
        "lamina.format": str(FORMAT_VERSION),
        "lamina.weights": weights_format(w),
        "lamina.tied": str(int(tied)),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, meta)
    return tied


# Suffixes of the tensors that describe a weight (its format, shape, parts) rather than
# hold it. `build_layer` reads them as host values, so a layer built over device arrays
# takes them from the host instead (`layer_descriptors`).
DESCRIPTOR_SUFFIXES = (
    ".parts",
    ".block_layout",
    ".block_kind",
    ".shape_t",
    ".act_threshold",
    ".in_features",
)


def layer_descriptors(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The descriptor tensors among a layer's `layer_arrays`."""
    return {name: a for name, a in arrays.items() if name.endswith(DESCRIPTOR_SUFFIXES)}


def layer_arrays(layer: LayerWeights, i: int) -> dict[str, np.ndarray]:
    """Decoder layer i's arrays under their checkpoint names (layers.i.qkv.data, ...):
    what `build_layer` turns back into the layer."""
    tensors = {}
    for name in LAYER_NORMS:
        if getattr(layer, name) is not None:
            tensors[f"layers.{i}.{name}"] = getattr(layer, name)
    for name in LAYER_LINEARS[:2] if layer.experts is not None else LAYER_LINEARS:
        _put(tensors, f"layers.{i}.{name}", getattr(layer, name))
    if layer.experts is not None:
        _put(tensors, f"layers.{i}.router", layer.experts.router)
        layer.experts.stack()  # each expert then a view: no second copy of them below
        for name in ("gate_up", "down"):
            tensors.update(_stacked_experts(layer.experts, name, f"layers.{i}.experts.{name}"))
    return tensors


def _stacked_experts(experts: ExpertWeights, proj: str, name: str) -> dict[str, np.ndarray]:
    """Projection `proj` of the experts under `name`.<part>, each part stacked along a
    leading expert axis (the stacked arrays themselves where `stack()` made them): one
    tensor per part, which loading maps back as one view per expert."""
    parts: list[dict[str, np.ndarray]] = []
    for weight in getattr(experts, proj):
        parts.append({})
        _put(parts[-1], "", weight)
    keys = parts[0].keys()
    if any(p.keys() != keys or any(p[k].shape != parts[0][k].shape for k in keys) for p in parts):
        raise UnsupportedModelError(f"the experts of {name} differ in format; they cannot be saved")
    stacked = (experts.stacked or {}).get(proj)
    arrays = {}
    for key in keys:
        whole = getattr(stacked, key[1:], None) if stacked is not None else None
        arrays[name + key] = (
            whole if isinstance(whole, np.ndarray) else np.stack([p[key] for p in parts])
        )
    return arrays


def _unstacked_experts(arrays: dict[str, Any], name: str, count: int, path) -> list[Weight]:
    """The experts `_stacked_experts` stored under `name`, each a weight of views."""
    stacked = {key[len(name) :]: a for key, a in arrays.items() if key.startswith(name + ".")}
    if not stacked:
        raise ModelLoadError(f"{path} has no tensor {name + '.*'!r}")
    if any(a.shape[:1] != (count,) for a in stacked.values()):
        raise ModelLoadError(f"{path}: {name} does not hold {count} experts")
    return [
        _weight({f"{name}.{e}{key}": a[e] for key, a in stacked.items()}, f"{name}.{e}", path)
        for e in range(count)
    ]


def _put(tensors: dict[str, np.ndarray], name: str, weight: Weight) -> None:
    """Store a weight under name.<part>; the parts present tell the loader its type."""
    if weight.bias is not None:
        tensors[name + ".bias"] = weight.bias
    if isinstance(weight, StackedWeight):
        tensors[name + ".parts"] = np.array([len(weight.parts)], dtype=np.int64)
        for j, part in enumerate(weight.parts):
            _put(tensors, f"{name}.part{j}", part)
        return
    if isinstance(weight, BlockWeight):
        for field in BLOCK_ARRAYS:
            if getattr(weight, field) is not None:
                tensors[f"{name}.{field}"] = getattr(weight, field)
        layout = [weight.group, weight.in_features, weight.out_features, weight.zero]
        tensors[name + ".block_layout"] = np.array(layout, dtype=np.int64)
        tensors[name + ".block_kind"] = np.frombuffer(weight.kind.encode(), dtype=np.uint8)
        return
    if isinstance(weight, ColskipBlockWeight):
        tensors[name + ".values_t"] = weight.values
        tensors[name + ".scale_t"] = weight.scale
        tensors[name + ".mins_t"] = weight.mins
        shape = [weight.in_features, weight.out_features]
        tensors[name + ".shape_t"] = np.array(shape, dtype=np.int64)
        tensors[name + ".act_threshold"] = np.array([weight.threshold], dtype=np.float32)
        return
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


def load_checkpoint_weights(folder: Path, num_layers: int) -> ModelWeights:
    """Memory-map model.safetensors of a lamina checkpoint into ModelWeights (no copies)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{folder} is a lamina checkpoint without model.safetensors")
    return load_weights_file(path, num_layers)


def load_weights_file(path: Path, num_layers: int) -> ModelWeights:
    """Memory-map a file `save_weights_file` wrote into ModelWeights (no copies)."""
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
    embed = _weight(arrays, "embed", path)
    layers = [build_layer(arrays, i, path) for i in range(num_layers)]
    lm_head = embed if meta.get("lamina.tied") == "1" else _weight(arrays, "lm_head", path)
    return ModelWeights(
        embed=embed, layers=layers, final_norm=_vector(arrays, "final_norm", path), lm_head=lm_head
    )


def _weight(arrays: dict[str, Any], name: str, path: Path | str) -> Weight:
    """The weight stored under name.<part>; the parts present tell its type."""

    def part(suffix: str) -> np.ndarray:
        return arrays[name + suffix]

    try:
        bias = arrays.get(name + ".bias")
        if name + ".parts" in arrays:
            count = int(part(".parts")[0])
            parts = [_weight(arrays, f"{name}.part{j}", path) for j in range(count)]
            return StackedWeight(parts, bias)
        if name + ".block_layout" in arrays:
            group, k, n, zero = (int(v) for v in part(".block_layout"))
            kind = part(".block_kind").tobytes().decode()
            fields = {f: arrays.get(f"{name}.{f}") for f in BLOCK_ARRAYS}
            if fields["values"] is None or fields["scale"] is None:
                raise KeyError(f"{name}.values" if fields["values"] is None else f"{name}.scale")
            _check_block_arrays(name, fields, group, k, n, path)
            return BlockWeight(
                group=group, in_features=k, out_features=n, kind=kind, zero=zero, bias=bias,
                **fields,
            )  # fmt: skip
        if name + ".values_t" in arrays:
            k, n = (int(v) for v in part(".shape_t"))
            values, scale, mins = part(".values_t"), part(".scale_t"), part(".mins_t")
            _check_colskip_arrays(name, values, scale, mins, k, n, path)
            threshold = float(part(".act_threshold")[0])
            if not (math.isfinite(threshold) and threshold >= 0):
                raise ModelLoadError(f"{path}: {name!r} has activation threshold {threshold}")
            return ColskipBlockWeight(values, scale, mins, k, n, threshold, bias)
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


def _check_block_arrays(name: str, fields: dict, group: int, k: int, n: int, path) -> None:
    """A stored block weight's arrays fit its layout (the kernels index them unchecked)."""
    groups, problem = row_groups(n), None
    if group not in GROUPS or k < 1 or n < 1:
        problem = f"group {group}, {n} x {k}"
    else:
        kp = padded_inputs(fields["scale"], group) if fields["scale"].ndim == 2 else -1
        two_level = fields["scale_sup"] is not None
        bytes_a_value = ROWS if fields["values"].dtype == np.int8 else ROWS // 2
        expected = {
            "values": (groups, kp * bytes_a_value),
            "high": (groups, kp * ROWS // 4),
            "scale": (groups, kp // group * ROWS),
            "mins": (groups, kp // group * ROWS),
            "scale_sup": (groups, kp // SUPER * ROWS),
            "mins_sup": (groups, kp // SUPER * ROWS),
        }
        if kp != padded_width(k, group, two_level):
            problem = f"{kp} padded inputs for {k}"
        for field, shape in expected.items():
            array = fields[field]
            if array is not None and array.shape != shape:
                problem = f"{field} of shape {array.shape}, expected {shape}"
        sups = [fields[f] for f in ("scale_sup", "mins_sup") if fields[f] is not None]
        if fields["high"] is not None and fields["values"].dtype != np.uint8:
            problem = "high bits beside 8-bit values"
        if any(a.dtype != np.uint16 for a in sups):
            problem = "second-level factors that are not float16"
    if problem:
        raise ModelLoadError(f"{path}: block weight {name!r} has {problem}")


def _check_colskip_arrays(name: str, values, scale, mins, k: int, n: int, path) -> None:
    """A stored activation-sparse 4-bit weight's arrays fit its shape (the kernel indexes
    them unchecked)."""
    groups = scale.shape[0] if scale.ndim == 2 and scale.shape[0] else 0
    group = values.shape[0] // groups if groups and values.ndim == 2 else 0
    expected_kp = -(-k // group) * group if group in SKIP_GROUPS else -1
    problem = None
    if group not in SKIP_GROUPS or values.shape[0] != expected_kp:
        problem = f"values of shape {values.shape} and scales {scale.shape} for {k} inputs"
    elif values.dtype != np.uint8 or values.shape[1] * 2 != padded_outputs(n):
        problem = f"values of shape {values.shape} and type {values.dtype} for {n} outputs"
    elif any(a.dtype != np.uint16 or a.shape != (groups, padded_outputs(n)) for a in (scale, mins)):
        problem = f"scales or minimums not float16 of shape {(groups, padded_outputs(n))}"
    if problem:
        raise ModelLoadError(f"{path}: activation-sparse weight {name!r} has {problem}")


def _vector(arrays: dict[str, Any], name: str, path: Path | str) -> np.ndarray:
    if name not in arrays:
        raise ModelLoadError(f"{path} has no tensor {name!r}")
    return arrays[name]


def build_layer(
    arrays: dict[str, Any], i: int, path: Path | str, experts: ExpertWeights | None = None
) -> LayerWeights:
    """Decoder layer i from arrays named as in the checkpoint (layers.i.qkv.data, ...): numpy
    arrays, or device arrays of a streamed layer; `path` names their source in errors.
    `experts`: the layer's experts when they are not among `arrays` (left in host memory
    while the rest of the layer goes to a device); they get the router from `arrays`."""
    p = f"layers.{i}."
    mlp = None
    if p + "router.data" in arrays:
        router = _weight(arrays, p + "router", path)
        if not isinstance(router, DenseWeight) or router.data.ndim != 2:
            raise ModelLoadError(f"{path}: the router of layer {i} is not a float32 matrix")
        if experts is not None:
            experts = dataclasses.replace(experts, router=router)
        else:
            experts = ExpertWeights(
                router,
                *(_unstacked_experts(arrays, f"{p}experts.{name}", router.out_features, path)
                  for name in ("gate_up", "down")),
            )  # fmt: skip
    else:
        mlp = {name: _weight(arrays, p + name, path) for name in ("gate_up", "down")}
    return LayerWeights(
        attn_norm=_vector(arrays, p + "attn_norm", path),
        qkv=_weight(arrays, p + "qkv", path),
        o_proj=_weight(arrays, p + "o_proj", path),
        ffn_norm=_vector(arrays, p + "ffn_norm", path),
        gate_up=mlp and mlp["gate_up"],
        down=mlp and mlp["down"],
        experts=experts,
        **{name: arrays.get(p + name) for name in LAYER_NORMS[2:]},
    )


def checkpoint_layer_tensors(folder: Path, num_layers: int) -> list[list[TensorSpec]]:
    """Each decoder layer's tensors in the checkpoint file: names, byte offsets, dtypes."""
    path = folder / "model.safetensors"
    header, data_start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    specs: list[list[TensorSpec]] = [[] for _ in range(num_layers)]
    for name, info in header.items():
        if not name.startswith("layers."):
            continue
        i = int(name.split(".", 2)[1])
        if i >= num_layers or info["dtype"] not in _DTYPES:
            raise ModelLoadError(f"tensor {name!r} in {path} does not fit the model's config")
        offset = data_start + info["data_offsets"][0]
        specs[i].append(
            TensorSpec(name, offset, np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]))
        )
    return specs


def open_layer_stream(
    folder: Path,
    resident: Mapping[int, Any],
    streamed: Sequence[int],
    tensors: list[list[TensorSpec]],
    buffers: int,
    drop_page_cache: bool,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> LayerStream:
    """Serve layers `streamed` of a checkpoint from disk through `buffers` host buffers
    (made by `allocate`: pinned ones when a GPU copies from them); `resident` are the
    layers served as they are (none, when the caller serves the others itself); `tensors`
    from checkpoint_layer_tensors. Streamed layers are rebuilt from the bytes read, so only
    formats that need no preparation by the backend are supported: int8 and f32 (the file
    is checked, since the backend may already have repacked the mapped weights)."""
    path = folder / "model.safetensors"
    for i in streamed:
        for spec in tensors[i]:
            if spec.name.rsplit(".", 1)[1] not in _STREAMABLE_PARTS:
                raise UnsupportedModelError(
                    f"streaming layers from disk supports int8 and f32 checkpoints, but tensor "
                    f"{spec.name!r} of {path} belongs to a sparse or block (4-bit, GGUF) "
                    "format: raise --cpu-memory so every layer fits, or use an int8 checkpoint"
                )
    return LayerStream(
        path,
        len(tensors),
        resident,
        {i: tensors[i] for i in streamed},
        lambda i, arrays: build_layer(arrays, i, path),
        buffers=buffers,
        drop_page_cache=drop_page_cache,
        allocate=allocate,
    )


def _view(mapped: np.ndarray, start: int, name: str, info: dict, path: Path) -> np.ndarray:
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ModelLoadError(f"tensor {name!r} in {path} has unexpected dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    return mapped[start + lo : start + hi].view(dtype).reshape(info["shape"])
