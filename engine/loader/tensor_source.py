"""Tensor sources: read named tensors from safetensors or GGUF files as float32 arrays.

Both sources speak Hugging Face tensor names and layouts, so one builder
(`engine.loader.weights_builder`) turns either into `ModelWeights`.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open

from engine.errors import ModelLoadError
from engine.loader.gguf_blocks import check_supported, repack
from engine.weights import BlockWeight, DenseWeight

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_GGUF_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# Bytes per element of the safetensors dtypes, to check a header before trusting its offsets.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


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
        if dtype == "BF16":
            # Registers bfloat16 with numpy so safetensors can return it; imported here, as
            # it takes 0.4 s, a third of a warm start from an int8 checkpoint.
            import ml_dtypes  # noqa: F401
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
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()
        ):
            raise ModelLoadError(f"{index}: weight_map must map tensor names to file names")
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
    """The JSON header of a .safetensors file and the byte offset where tensor data starts.

    Every entry is checked (dtype, shape, offsets inside the file and matching the shape), so
    callers can slice the mapped file by it without further checks.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_len > size - 8:
            raise ModelLoadError(
                f"{path} is truncated or corrupt: its header length field says {header_len} "
                f"bytes, but the file has {size}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} has a corrupt safetensors header: not a JSON object")
    start = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelLoadError(f"{path}: __metadata__ must map names to strings")
        else:
            _check_header_entry(path, name, info, size - start)
    return header, start


def _check_header_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    """One tensor's dtype, shape and data_offsets: known, consistent, inside the file."""
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path}: the header entry of tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
        raise ModelLoadError(f"{path}: tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelLoadError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ModelLoadError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    lo, hi = offsets
    if hi > data_size:
        raise ModelLoadError(
            f"{path} is truncated: tensor {name!r} ends at byte {hi} of the data, "
            f"but the file holds {data_size} bytes of data"
        )
    if hi - lo != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has data_offsets {offsets} that do not match its "
            f"shape {shape} of {dtype}"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# GGUF tensor names for the Hugging Face names the builder asks for.
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",  # phi3's fused projections
    "mlp.gate_up_proj": "ffn_up",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",  # the routers of Qwen3-MoE and Mixtral
    "block_sparse_moe.gate": "ffn_gate_inp",
}
# Models with norms after attention and after the MLP too (Gemma's "sandwich"): there the
# Hugging Face post_attention_layernorm follows attention and pre_feedforward_layernorm
# precedes the MLP, which GGUF calls ffn_norm.
GGUF_SANDWICH_NORM_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Rope tensors a GGUF may carry, by the RopeConfig field they fill: llama3 scaling as
# per-frequency divisors, LongRoPE's factors. The config reads them, not the builder.
GGUF_ROPE_TENSORS = {
    "rope_freqs.weight": "freq_factors",
    "rope_factors_short.weight": "short_factor",
    "rope_factors_long.weight": "long_factor",
}
# GGUF stacks a layer's experts into one tensor per projection (experts, rows, inputs).
GGUF_EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",  # Mixtral's names
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
# An expert matrix's Hugging Face name: (layer, expert, projection).
GGUF_EXPERT_RE = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$"
)
GGUF_GLOBAL_NAMES = {
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
        self,
        path: Path,
        reader: Any,
        num_heads: int,
        num_kv_heads: int,
        permute_qk: bool,
        sandwich_norms: bool = False,
    ):
        self.path = path
        self._tensors = {t.name: t for t in reader.tensors}
        self._heads = num_heads
        self._kv_heads = num_kv_heads
        self._permute_qk = permute_qk
        self._layer_names = GGUF_LAYER_NAMES
        if sandwich_norms:
            self._layer_names = {**GGUF_LAYER_NAMES, **GGUF_SANDWICH_NORM_NAMES}

    def gguf_name(self, name: str) -> str:
        return self._locate(name)[0]

    def _locate(self, name: str) -> tuple[str, int | None]:
        """The file's tensor holding `name`, and the expert's index in it for an expert's
        matrix (None otherwise)."""
        if name in GGUF_GLOBAL_NAMES:
            return GGUF_GLOBAL_NAMES[name], None
        m = GGUF_EXPERT_RE.match(name)
        if m and m.group(3) in GGUF_EXPERT_NAMES:
            return f"blk.{m.group(1)}.{GGUF_EXPERT_NAMES[m.group(3)]}.weight", int(m.group(2))
        m = _LAYER_RE.match(name)
        if m and m.group(2) in self._layer_names:
            return f"blk.{m.group(1)}.{self._layer_names[m.group(2)]}.{m.group(3)}", None
        return name, None

    def has(self, name: str) -> bool:
        found, expert = self._locate(name)
        if found not in self._tensors:
            return False
        # A stacked tensor holds experts, read one at a time; any other (a matrix, a norm, a
        # bias) is read whole.
        dims = len(self._tensors[found].shape)
        if expert is None:
            return dims <= 2
        return dims == 3 and expert < self._dims(found)[0]

    def _dims(self, found: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[found].shape))

    def shape(self, name: str) -> tuple[int, ...]:
        found, expert = self._locate(name)
        dims = self._dims(found)
        return dims if expert is None else dims[1:]

    def describe(self, name: str) -> str:
        return f"{self.gguf_name(name)!r} ({name})"

    def unused(self, used: set[str]) -> list[str]:
        # The rope tensors carry rope scaling; the config already read them.
        known = {self.gguf_name(n) for n in used} | set(GGUF_ROPE_TENSORS)
        return [n for n in self._tensors if n not in known]

    def load_native(self, name: str) -> BlockWeight | DenseWeight:
        """Matrix `name` in the file's own quantization: a BlockWeight repacked exactly from
        its blocks (see gguf_blocks), or float32 for float tensors."""
        found, expert = self._locate(name)
        tensor = self._tensors[found]
        type_name = tensor.tensor_type.name
        if type_name in _GGUF_FLOAT_TYPES:
            return DenseWeight(self.load(name))
        check_supported(type_name, self.describe(name))
        n, k = self.shape(name)
        mapped = self._data(tensor, expert).reshape(n, -1)
        raw = mapped
        if self._permute_qk and ".self_attn.q_proj." in name:
            raw = _unpermute_rows(mapped, self._heads)
        elif self._permute_qk and ".self_attn.k_proj." in name:
            raw = _unpermute_rows(mapped, self._kv_heads)
        if raw is not mapped:
            _release(mapped)  # copied in a new row order: the mapped pages are done with
        return repack(type_name, raw, k, done=_release)

    def load(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        found, expert = self._locate(name)
        tensor = self._tensors[found]
        try:
            arr = dequantize(self._data(tensor, expert), tensor.tensor_type)
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

    @staticmethod
    def _data(tensor: Any, expert: int | None) -> np.ndarray:
        """The tensor's bytes or values, or one expert's of a stacked tensor, as a plain
        ndarray view (numpy memmap subclass bookkeeping tripled dequantization time)."""
        data = np.asarray(tensor.data)
        return data if expert is None else data.reshape(tensor.shape[-1], -1)[expert]


def _release(view: np.ndarray) -> None:
    """Drop the mapped file pages behind `view` from this process's resident set once they
    are repacked (the page cache keeps them): peak RSS stays near the repacked size instead
    of the repacked size plus the file."""
    base = view
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = view.__array_interface__["data"][0]
    origin = np.frombuffer(base, np.uint8, count=1).__array_interface__["data"][0]
    page = mmap.PAGESIZE
    lo = (start - origin) // page * page
    hi = start - origin + view.nbytes
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's (head, 2, dim/2) -> (head, dim/2, 2) row interleave."""
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )
