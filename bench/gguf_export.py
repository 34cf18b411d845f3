"""Write a Hugging Face model folder as a GGUF file, the way llama.cpp's converter lays it out
(Q/K rows permuted for llama, GGUF tensor names), with the default model's tokenizer; and
quantize a GGUF to Q8_0 with llama.cpp itself, so llama.cpp runs on the same weights as lamina.

Tests use the export to check lamina's GGUF reader; the bench uses both for its llama.cpp peer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from engine.loader.tensor_source import (
    GGUF_EXPERT_NAMES,
    GGUF_EXPERT_RE,
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row interleave for its rope layout (the inverse of what lamina undoes)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _copy_tokenizer(writer: gguf.GGUFWriter, source: gguf.GGUFReader) -> None:
    for field in source.fields.values():
        name, value = field.name, field.contents()
        if name == "tokenizer.ggml.tokens":
            writer.add_token_list(value)
        elif name == "tokenizer.ggml.merges":
            writer.add_token_merges(value)
        elif name == "tokenizer.ggml.token_type":
            writer.add_token_types(value)
        elif name == "tokenizer.ggml.model":
            writer.add_tokenizer_model(value)
        elif name == "tokenizer.ggml.pre":
            writer.add_tokenizer_pre(value)
        elif name == "tokenizer.chat_template":
            writer.add_chat_template(value)
        elif name.startswith("tokenizer.ggml.") and name.endswith("_id"):
            writer.add_uint32(name, value)


# GGUF's architecture names for the model types that differ (Mixtral is written as a llama).
_GGUF_ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}


class _Folder:
    """The tensors of a Hugging Face folder's safetensors shards, read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.handles = {}
        for path in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(path), "np")
            self.handles.update(dict.fromkeys(handle.keys(), handle))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[name].get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        return self.handles[name].get_tensor(name).astype(np.float32)


def _plan(cfg: dict, folder: _Folder) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(GGUF name, shape, loader) of every tensor, in the file's order: a layer's experts
    stacked into one (experts, rows, inputs) tensor per projection, as llama.cpp stores them."""
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    stacks: dict[str, dict[int, str]] = {}
    plan = []
    for name in folder.handles:
        expert = GGUF_EXPERT_RE.match(name)
        if expert:
            layer, e, proj = expert.groups()
            gguf_name = f"blk.{layer}.{GGUF_EXPERT_NAMES[proj]}.weight"
            if gguf_name not in stacks:
                stacks[gguf_name] = {}
                plan.append((gguf_name, None, None))
            stacks[gguf_name][int(e)] = name
            continue
        if name in GGUF_GLOBAL_NAMES:
            gguf_name, permute = GGUF_GLOBAL_NAMES[name], None
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            gguf_name = f"blk.{parts[2]}.{GGUF_LAYER_NAMES[module]}.{parts[-1]}"
            llama_rope = arch in ("llama", "mixtral")
            permute = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(module)
            permute = permute if llama_rope else None
        plan.append((gguf_name, folder.shape(name), _loader(folder, name, permute)))
    for i, (gguf_name, shape, load) in enumerate(plan):
        if load is None:
            names = [stacks[gguf_name][e] for e in sorted(stacks[gguf_name])]
            shape = (len(names), *folder.shape(names[0]))
            plan[i] = (
                gguf_name,
                shape,
                lambda names=names: np.stack([folder.load(n) for n in names]),
            )
    return plan


def _loader(folder: _Folder, name: str, permute: int | None) -> Callable[[], np.ndarray]:
    if permute is None:
        return lambda: folder.load(name)
    return lambda: _permute(folder.load(name), permute)


def _write_metadata(w: gguf.GGUFWriter, cfg: dict, tokenizer_gguf: Path) -> None:
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "norm_topk_prob" in cfg:  # llama.cpp's Qwen3-MoE renormalises whatever it says
            w.add_expert_weights_norm(cfg["norm_topk_prob"])
    _copy_tokenizer(w, gguf.GGUFReader(tokenizer_gguf))


def export_gguf(
    folder: Path,
    out: Path,
    tokenizer_gguf: Path,
    half: bool = False,
    qtype: Callable[[str], str | None] | None = None,
) -> Path:
    """Write the Hugging Face model in `folder` as a GGUF, as llama.cpp's converter does.

    `half` stores matrices as float16; `qtype` maps a GGUF tensor name to the block type its
    matrix is stored in (one the gguf package can quantize: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or
    None to keep it float. Tensors are read and written one at a time, so a model larger than
    the memory exports too.
    """
    cfg = json.loads((folder / "config.json").read_text())
    w = gguf.GGUFWriter(out, _GGUF_ARCH.get(cfg["model_type"], cfg["model_type"]))
    _write_metadata(w, cfg, tokenizer_gguf)
    plan = []
    for gguf_name, shape, load in _plan(cfg, _Folder(folder)):
        block_type = qtype(gguf_name) if qtype and len(shape) == 2 else None
        kind = gguf.GGMLQuantizationType[block_type] if block_type else None
        dtype = np.float16 if half and len(shape) >= 2 else np.float32
        if kind is not None:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            nbytes = int(np.prod(byte_shape))
            w.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
        else:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes)
        plan.append((load, kind, dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for load, kind, dtype in plan:
        tensor = load()
        w.write_tensor_data(gguf.quants.quantize(tensor, kind) if kind else tensor.astype(dtype))
    w.close()
    return out
