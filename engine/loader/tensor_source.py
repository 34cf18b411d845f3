"""Tensor sources: read named tensors from safetensors or GGUF files as float32 arrays.

Both sources speak Hugging Face tensor names and layouts, so one builder
(`engine.loader.weights_builder`) turns either into `ModelWeights`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np
from safetensors import SafetensorError, safe_open

from engine.errors import ModelLoadError

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class TensorSource(Protocol):
    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray: ...

    def describe(self, name: str) -> str:
        """How the file itself names tensor `name`, for error messages."""
        ...

    def unused(self, used: set[str]) -> list[str]:
        """Tensors in the file that are neither in `used` nor known to be ignorable."""
        ...


class SafetensorsSource:
    """One or more (sharded) .safetensors files, memory-mapped by the safetensors library."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files = _safetensors_files(folder)
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for path in files:
            handle = _open_safetensors(path)
            self._handles[path] = handle
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                self._where[key] = path

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def describe(self, name: str) -> str:
        return repr(name)

    def unused(self, used: set[str]) -> list[str]:
        # Old checkpoints store the rotary inverse frequencies as a buffer; they are recomputed.
        return [n for n in self._where if n not in used and not n.endswith("rotary_emb.inv_freq")]

    def load(self, name: str) -> np.ndarray:
        path = self._where[name]
        handle = self._handles[path]
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(
                f"tensor {name!r} in {path.name} has dtype {dtype}; expected f32/f16/bf16"
            )
        try:
            return np.ascontiguousarray(handle.get_tensor(name), dtype=np.float32)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{path} is truncated or corrupt (reading {name!r}): {exc}"
            ) from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(
                f"{index.name} names shard(s) that are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights found in {folder}")
    return files


def _open_safetensors(path: Path) -> Any:
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is truncated or corrupt: {exc}") from None
    read_safetensors_header(path)  # a truncated file can still have a readable header
    return handle


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a .safetensors file and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path} has a corrupt safetensors header: {exc}") from None
    start = 8 + header_len
    data_end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
    )
    size = path.stat().st_size
    if start + data_end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header describes {start + data_end} bytes "
            f"but the file has {size}"
        )
    return header, start


# GGUF tensor names for the Hugging Face names the builder asks for.
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFSource:
    """Tensors of a GGUF file, dequantized by the `gguf` package on demand.

    llama.cpp's converter permutes the Q and K rows of llama-family models for its interleaved
    RoPE; `load` undoes that so the arrays match the Hugging Face layout.
    """

    def __init__(
        self, path: Path, reader: Any, num_heads: int, num_kv_heads: int, permute_qk: bool
    ):
        self.path = path
        self._tensors = {t.name: t for t in reader.tensors}
        self._heads = num_heads
        self._kv_heads = num_kv_heads
        self._permute_qk = permute_qk

    def gguf_name(self, name: str) -> str:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _GGUF_LAYER_NAMES:
            return f"blk.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        return name

    def has(self, name: str) -> bool:
        return self.gguf_name(name) in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[self.gguf_name(name)].shape))

    def describe(self, name: str) -> str:
        return f"{self.gguf_name(name)!r} ({name})"

    def unused(self, used: set[str]) -> list[str]:
        # rope_freqs carries llama3 rope scaling; the config already read it.
        known = {self.gguf_name(n) for n in used} | {"rope_freqs.weight"}
        return [n for n in self._tensors if n not in known]

    def load(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[self.gguf_name(name)]
        try:
            # a plain ndarray view: numpy memmap subclass bookkeeping tripled dequant time
            arr = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"tensor {name!r} uses GGUF type {tensor.tensor_type.name}, which the gguf package "
                "cannot dequantize"
            ) from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(self.shape(name))
        if self._permute_qk and ".self_attn.q_proj." in name:
            arr = _unpermute_rows(arr, self._heads)
        elif self._permute_qk and ".self_attn.k_proj." in name:
            arr = _unpermute_rows(arr, self._kv_heads)
        return arr


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's (head, 2, dim/2) -> (head, dim/2, 2) row interleave."""
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )
