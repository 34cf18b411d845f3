"""GGUF block types repacked, exactly, into lamina's block format (`BlockWeight`).

Every type below becomes the layout of kernels_cpu.simd_blocks (rows interleaved 16 at a
time; 4-bit values two a byte, 6-bit ones as 4-bit plus a plane of their top bits, 8-bit ones
a signed byte each; the per-group scales and minimums in their own arrays): each type's
decoder below yields row-major values and factors, and `BlockWeight.from_rows` interleaves
them. The repacked matrix
dequantizes to the same float32 bits as the `gguf` package's dequantizer (the tests check
every type), because it keeps the stored numbers and the order of the arithmetic:

| GGUF | values | group | scale (x sup) | minimum | zero | bits a weight (file) |
|------|--------|-------|---------------|---------|------|------|
| Q4_0 | 4-bit  | 32    | f16 d         | -       | 8    | 4.5 (4.5) |
| Q4_1 | 4-bit  | 32    | f16 d         | f16 m   | 0    | 5.0 (5.0) |
| Q5_0 | 6-bit  | 32    | f16 d         | -       | 16   | 6.5 (5.5) |
| Q5_1 | 6-bit  | 32    | f16 d         | f16 m   | 0    | 7.0 (6.0) |
| Q8_0 | int8   | 32    | f16 d         | -       | 0    | 8.5 (8.5) |
| Q4_K | 4-bit  | 32    | u8 sc x f16 d | u8 m x f16 -dmin | 0 | 4.6 (4.5) |
| Q5_K | 6-bit  | 32    | u8 sc x f16 d | u8 m x f16 -dmin | 0 | 6.6 (5.5) |
| Q6_K | 6-bit  | 16    | i8 sc x f16 d | -       | 32   | 6.6 (6.6) |

6-bit values keep their low four bits as 4-bit ones do and their top two in a plane of their
own, so the 5-bit types (top bit zero) cost a fifth more than their file and the rest what
their file does. One multiply step serves every type. Other types are refused with the
nearest supported one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from engine.errors import UnsupportedModelError
from engine.weights import BLOCK_ARRAYS, BlockWeight
from kernels_cpu.matmul_blocks import padded_width, row_groups
from kernels_cpu.simd_blocks import ROWS

# Bytes per block and columns per block of each supported type.
BLOCK_BYTES = {
    "Q4_0": (18, 32),
    "Q4_1": (20, 32),
    "Q5_0": (22, 32),
    "Q5_1": (24, 32),
    "Q8_0": (34, 32),
    "Q4_K": (144, 256),
    "Q5_K": (176, 256),
    "Q6_K": (210, 256),
}
SUPPORTED = tuple(BLOCK_BYTES)
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # 32-input blocks, an f16 scale first
CHUNK_ROWS = 256  # rows repacked at a time (a multiple of the 16-row groups)
# What to convert a file to when lamina cannot run its type (by llama-quantize).
_NEAREST = {
    "Q2_K": "Q4_K",
    "Q3_K": "Q4_K",
    "Q8_1": "Q8_0",
    "Q8_K": "Q8_0",
    "IQ4_NL": "Q4_0",
    "IQ4_XS": "Q4_K",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "MXFP4": "Q4_0",
}


def check_supported(type_name: str, tensor: str) -> None:
    """Refuse a block type lamina does not run, naming the nearest one it does."""
    if type_name in BLOCK_BYTES:
        return
    nearest = _NEAREST.get(type_name, "Q4_K" if type_name.startswith("IQ") else "Q8_0")
    raise UnsupportedModelError(
        f"tensor {tensor} is GGUF type {type_name}, which lamina cannot run; supported: "
        f"{', '.join(SUPPORTED)} (convert it with llama-quantize, e.g. to {nearest}), or load "
        "it with --quant f32 / int8 to dequantize it"
    )


def repack(
    type_name: str, raw: np.ndarray, k: int, done: Callable[[np.ndarray], None] | None = None
) -> BlockWeight:
    """The BlockWeight of a GGUF matrix whose rows (N, row bytes) uint8 hold k columns each.

    Rows are repacked CHUNK_ROWS at a time into the final arrays, so numpy's temporaries stay
    small (and in cache) and peak memory is the result plus one chunk; `done` gets each
    chunk of `raw` once it is repacked (to release its mapped pages)."""
    nbytes, cols = BLOCK_BYTES[type_name]
    n = raw.shape[0]
    if k % cols or raw.shape[1] != k // cols * nbytes:
        raise UnsupportedModelError(
            f"a {type_name} row of {k} columns must be {k // cols * nbytes} bytes, not "
            f"{raw.shape[1]}"
        )
    arrays: dict[str, np.ndarray] = {}
    first = None
    for r0 in range(0, n, CHUNK_ROWS):
        chunk = raw[r0 : r0 + CHUNK_ROWS]
        part = _REPACK[type_name](chunk.reshape(len(chunk), k // cols, nbytes), k)
        if first is None:
            first = part
            arrays = {
                name: np.empty((row_groups(n), a.shape[1]), a.dtype)
                for name in BLOCK_ARRAYS
                if (a := getattr(part, name)) is not None
            }
        g0 = r0 // ROWS
        for name, out in arrays.items():
            piece = getattr(part, name)
            out[g0 : g0 + len(piece)] = piece
        if done is not None:
            done(chunk)
    return dataclasses.replace(first, out_features=n, **arrays)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 (as uint16 bits) at byte `at` of every block: (N, blocks)."""
    return np.ascontiguousarray(blocks[:, :, at : at + 2]).view(np.uint16)[:, :, 0]


def _padded(array: np.ndarray, width: int) -> np.ndarray:
    """array (N, w) with zero columns up to `width`, C-contiguous."""
    if array.shape[1] == width:
        return np.ascontiguousarray(array)
    out = np.zeros((array.shape[0], width), array.dtype)
    out[:, : array.shape[1]] = array
    return out


def _nibble_columns(qs: np.ndarray) -> np.ndarray:
    """(N, blocks, 16) bytes of 32-column blocks (low nibbles columns 0-15, high 16-31) ->
    (N, blocks, 32) values in column order."""
    return np.concatenate([qs & 15, qs >> 4], axis=2)


def _fifth_bits(qh: np.ndarray, blocks: int) -> np.ndarray:
    """(N, blocks, 4) bytes of little-endian 32-bit masks -> (N, blocks, 32) bit j << 4."""
    bits = np.unpackbits(qh, axis=2, bitorder="little")
    return (bits << 4).reshape(qh.shape[0], blocks, 32)


def _legacy(blocks: np.ndarray, k: int, type_name: str) -> BlockWeight:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 32-column blocks, an f16 scale (and minimum) first."""
    n, nb, _ = blocks.shape
    kp = padded_width(k, 32)
    scale = _padded(_f16(blocks, 0), kp // 32)
    has_min = type_name in ("Q4_1", "Q5_1")
    mins = _padded(_f16(blocks, 2), kp // 32) if has_min else None
    at = 4 if has_min else 2
    if type_name == "Q8_0":
        q = _padded(blocks[:, :, at:].view(np.int8).reshape(n, k), kp)
        return BlockWeight.from_rows(q, 8, scale, k, type_name)
    if type_name in ("Q4_0", "Q4_1"):
        q = _padded(_nibble_columns(blocks[:, :, at:]).reshape(n, k), kp)
        zero = 8 if type_name == "Q4_0" else 0
        return BlockWeight.from_rows(q, 4, scale, k, type_name, zero, mins=mins)
    high = _fifth_bits(blocks[:, :, at : at + 4], nb)
    q = _padded((_nibble_columns(blocks[:, :, at + 4 :]) | high).reshape(n, k), kp)
    zero = 16 if type_name == "Q5_0" else 0
    return BlockWeight.from_rows(q, 6, scale, k, type_name, zero, mins=mins)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit sub-scales and sub-minimums of Q4_K / Q5_K blocks: (N, blocks, 12) bytes ->
    two (N, blocks * 8) uint8 arrays."""
    n, nb, _ = scales.shape
    d, m, md = scales[:, :, 0:4], scales[:, :, 4:8], scales[:, :, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=2)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=2)
    return sc.reshape(n, nb * 8), mn.reshape(n, nb * 8)


def _sup(blocks: np.ndarray, at: int, negate: bool = False) -> np.ndarray:
    """The f16 super-block factor at byte `at` (N, blocks), as float16 bits; negated by its
    sign bit, which is exact."""
    bits = _f16(blocks, at)
    return bits ^ np.uint16(0x8000) if negate else bits


def _k_levels(blocks: np.ndarray) -> tuple[np.ndarray, dict]:
    """Q4_K / Q5_K's sub-scales, and their second levels and minimums as keywords of
    BlockWeight.from_rows."""
    sc, mn = _k_scales(blocks[:, :, 4:16])
    return sc, {"scale_sup": _sup(blocks, 0), "mins": mn, "mins_sup": _sup(blocks, 2, True)}


def _q4_k(blocks: np.ndarray, k: int) -> BlockWeight:
    n, nb, _ = blocks.shape
    sc, levels = _k_levels(blocks)
    qs = blocks[:, :, 16:].reshape(n, nb, 4, 32)  # chunk c: columns 64 c + j (low), + 32 (high)
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k)
    return BlockWeight.from_rows(q, 4, sc, k, "Q4_K", **levels)


def _q5_k(blocks: np.ndarray, k: int) -> BlockWeight:
    n, nb, _ = blocks.shape
    sc, levels = _k_levels(blocks)
    qh = blocks[:, :, 16:48]  # bit i of byte j: column 32 i + j of the block
    qs = blocks[:, :, 48:].reshape(n, nb, 4, 32)
    low = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    high = np.unpackbits(qh[:, :, None, :], axis=2, bitorder="little") << 4
    q = (low | high).reshape(n, k)
    return BlockWeight.from_rows(q, 6, sc, k, "Q5_K", **levels)


def _q6_k(blocks: np.ndarray, k: int) -> BlockWeight:
    n, nb, _ = blocks.shape
    ql = blocks[:, :, :128].reshape(n, nb, 2, 64)
    qh = blocks[:, :, 128:192].reshape(n, nb, 2, 1, 32)
    low = np.stack([ql & 15, ql >> 4], axis=3).reshape(n, nb, 2, 128)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3) << 4
    q = (low | high.reshape(n, nb, 2, 128)).reshape(n, k)
    scale = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).reshape(n, nb * 16)
    return BlockWeight.from_rows(q, 6, scale, k, "Q6_K", 32, scale_sup=_sup(blocks, 208))


_REPACK = {
    **{name: (lambda b, k, name=name: _legacy(b, k, name)) for name in _LEGACY},
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(weight: BlockWeight) -> np.ndarray:
    """The float32 (N, K) matrix of a BlockWeight: d * (q - zero) + m, as GGUF computes it."""
    from kernels_cpu.matmul_blocks import dequantize_rows_into

    n = weight.out_features
    out = np.empty((n, weight.in_features), np.float32)
    dequantize_rows_into(*weight.kernel_arrays, n, np.arange(n, dtype=np.int64), out)
    return out
