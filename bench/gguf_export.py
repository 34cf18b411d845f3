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
from safetensors.numpy import load_file

from engine.loader.tensor_source import GGUF_LAYER_NAMES

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


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


def _tensors(folder: Path):
    for path in sorted(folder.glob("*.safetensors")):
        yield from load_file(path).items()


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
    None to keep it float.
    """
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(out, arch)
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
    _copy_tokenizer(w, gguf.GGUFReader(tokenizer_gguf))
    for name, tensor in _tensors(folder):
        tensor = tensor.astype(np.float32)
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            gguf_name = f"blk.{parts[2]}.{GGUF_LAYER_NAMES[module]}.{parts[-1]}"
            if arch == "llama" and module == "self_attn.q_proj":
                tensor = _permute(tensor, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                tensor = _permute(tensor, kv_heads)
        block_type = qtype(gguf_name) if qtype and tensor.ndim == 2 else None
        if block_type:
            kind = gguf.GGMLQuantizationType[block_type]
            w.add_tensor(gguf_name, gguf.quants.quantize(tensor, kind), raw_dtype=kind)
            continue
        if half and tensor.ndim == 2:
            tensor = tensor.astype(np.float16)
        w.add_tensor(gguf_name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
