"""Typed weights: what loaders produce and backends consume.

A weight carries its arrays and whatever a kernel needs to use them; the Backend picks the
kernel from the weight's type, so model code never sees formats. Later formats (int8, int4,
sparse) are further classes next to `DenseWeight`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class _Matrix:
    """Shape accessors shared by every weight format; `data` is (out_features, in_features)."""

    data: np.ndarray

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return self.data.shape[1]


def read_only(*arrays: np.ndarray | None) -> None:
    """Mark the numpy arrays among `arrays` read-only, whatever made them (a loader's new
    array, a mapped file's view): numba compiles a kernel once per argument type, and
    writability is part of it, so kernels see one type however the weights were loaded."""
    for array in arrays:
        if isinstance(array, np.ndarray):
            array.setflags(write=False)


@dataclass
class DenseWeight(_Matrix):
    """A float32 matrix of shape (out_features, in_features) with an optional bias."""

    data: np.ndarray
    bias: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.bias is None else self.bias.nbytes)


@dataclass
class Int8Weight(_Matrix):
    """Symmetric int8 matrix (out_features, in_features) with one float32 scale per output row.

    Row r is `data[r] * scale[r]`. Used for linears, the embedding table and the output head.
    """

    data: np.ndarray  # int8
    scale: np.ndarray  # float32 (out_features,)
    bias: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.nbytes
        return self.data.nbytes + self.scale.nbytes + extra


@dataclass
class SparseInt8Weight:
    """A pruned int8 matrix in bitmask form: only the nonzero int8 values are stored.

    mask (out, ceil16(in) / 8) uint8 says which columns of a row are nonzero (bit c % 8 of
    byte c // 8, LSB first); values holds those int8 values row after row, row_ptr (out + 1)
    where each row's start. At 50% sparsity that is 5/8 of the dense bytes, which is what a
    memory-bound decode GEMV pays for. scale is per output row, as in Int8Weight.
    """

    mask: np.ndarray
    values: np.ndarray
    row_ptr: np.ndarray
    scale: np.ndarray
    in_features: int
    bias: np.ndarray | None = None

    @property
    def out_features(self) -> int:
        return self.mask.shape[0]

    @property
    def nbytes(self) -> int:
        arrays = (self.mask, self.values, self.row_ptr, self.scale, self.bias)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class ColskipInt8Weight:
    """An int8 matrix stored input-major for activation sparsity (TEAL).

    data_t (in, out) is the transpose of Int8Weight.data, so that the weights of one input
    feature are contiguous: inputs with |x| <= threshold are treated as zero, and their rows of
    data_t are never read. threshold was calibrated to zero a chosen share of this layer's
    inputs; scale is per output feature.
    """

    data_t: np.ndarray
    scale: np.ndarray
    threshold: float
    bias: np.ndarray | None = None

    @property
    def out_features(self) -> int:
        return self.data_t.shape[1]

    @property
    def in_features(self) -> int:
        return self.data_t.shape[0]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.nbytes
        return self.data_t.nbytes + self.scale.nbytes + extra


@dataclass
class ColskipBlockWeight:
    """A 4-bit matrix stored input-major for activation sparsity (TEAL), as
    kernels_cpu.colskip_blocks reads it.

    Row k of `values` (Kp, Np / 2) holds input k's 4-bit values for every output, so inputs
    with |x| <= threshold are rows never read; `scale` and `mins` (Kp / group, Np) hold each
    group's and output's float16 scale d and minimum m: w = d * q + m. threshold was
    calibrated to zero a chosen share of this layer's inputs.
    """

    values: np.ndarray
    scale: np.ndarray
    mins: np.ndarray
    in_features: int
    out_features: int
    threshold: float
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        read_only(self.values, self.scale, self.mins)

    @property
    def group(self) -> int:
        return self.values.shape[0] // self.scale.shape[0]

    @property
    def nbytes(self) -> int:
        arrays = (self.values, self.scale, self.mins, self.bias)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class BlockWeight:
    """A group-quantized matrix: each group of `group` inputs of a row holds small integers q
    with a scale d (and a minimum m for formats that have one): w = d * (q - zero) + m.

    The layout is kernels_cpu.simd_blocks': rows interleaved 16 at a time (groups =
    ceil(out / 16) rows of each array), inputs padded to Kp = matmul_blocks.padded_width.
    `values` holds 4-bit values (uint8, Kp * 8 bytes a group) or 8-bit ones (int8, Kp * 16);
    6-bit values keep their low 4 bits there and their top two in `high`. `scale` and `mins`
    hold a factor per group of inputs and row, as float32, float16 bits (uint16), or uint8 /
    int8 sub-factors that `scale_sup` / `mins_sup` (float16 bits, per 256 inputs) multiply, as
    GGUF's K-quants store them. `from_rows` builds them from row-major values and factors;
    every GGUF block type lamina runs is repacked into this
    exactly (engine.loader.gguf_blocks); `kind` names where it came from ("Q4_K", "int4-g64").
    """

    values: np.ndarray
    scale: np.ndarray
    group: int
    in_features: int
    out_features: int
    kind: str
    zero: int = 0
    high: np.ndarray | None = None
    scale_sup: np.ndarray | None = None
    mins: np.ndarray | None = None
    mins_sup: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        read_only(*(getattr(self, name) for name in BLOCK_ARRAYS))

    @classmethod
    def from_rows(
        cls,
        q: np.ndarray,
        bits: int,
        scale: np.ndarray,
        in_features: int,
        kind: str,
        zero: int = 0,
        **factors: np.ndarray | None,
    ) -> BlockWeight:
        """The weight of row-major values q (N, Kp: uint8 for 4 and 6 bits, int8 for 8) and
        row-major factors (N, Kp / group) and (N, Kp / 256) for the second levels, given as
        scale_sup, mins, mins_sup (and bias) keywords."""
        from kernels_cpu.matmul_blocks import interleave_factors, interleave_values

        values, high = interleave_values(q, bits)
        bias = factors.pop("bias", None)
        grouped = {name: interleave_factors(a) for name, a in factors.items()}
        group = q.shape[1] // scale.shape[1]
        return cls(values, interleave_factors(scale), group, in_features, q.shape[0], kind,
                   zero, high, bias=bias, **grouped)  # fmt: skip

    @property
    def bits(self) -> int:
        if self.values.dtype == np.int8:
            return 8
        return 4 if self.high is None else 6

    @property
    def nbytes(self) -> int:
        arrays = [getattr(self, name) for name in BLOCK_ARRAYS] + [self.bias]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def kernel_arrays(self) -> tuple:
        """(values, high, scale, scale_sup, mins, mins_sup, group, zero): the block kernels'
        leading arguments, in their order."""
        return (self.values, self.high, self.scale, self.scale_sup, self.mins, self.mins_sup,
                self.group, self.zero)  # fmt: skip

    def layout(self) -> tuple:
        """What two weights must share to be stacked into one (fused q/k/v, gate/up)."""
        arrays = (getattr(self, name) for name in BLOCK_ARRAYS)
        dtypes = tuple(None if a is None else a.dtype.str for a in arrays)
        return (dtypes, self.group, self.in_features, self.zero, self.values.shape[1])


# BlockWeight's per-row arrays, which stacking rows concatenates.
BLOCK_ARRAYS = ("values", "high", "scale", "scale_sup", "mins", "mins_sup")


@dataclass
class StackedWeight:
    """Linears that read the same input, in formats that cannot be concatenated (a Q4_K_M
    file's Q4_K attn_q and Q6_K attn_v): one output, each part writing its own columns."""

    parts: list
    bias: np.ndarray | None = None

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.nbytes)


Weight = (
    DenseWeight
    | Int8Weight
    | SparseInt8Weight
    | ColskipInt8Weight
    | ColskipBlockWeight
    | BlockWeight
    | StackedWeight
)
# The linear layers of a decoder block, by their LayerWeights field names.
LAYER_LINEARS = ("qkv", "o_proj", "gate_up", "down")
# Its norm weights (the last four only in some architectures).
LAYER_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def has_blocks(weights: ModelWeights) -> bool:
    """Whether any matrix of the model is in a block format."""
    matrices = [weights.embed, weights.lm_head]
    matrices += [w for layer in weights.layers for _, w in layer.linears()]
    return any(
        isinstance(m, BlockWeight)
        or isinstance(m, StackedWeight)
        and any(isinstance(p, BlockWeight) for p in m.parts)
        for m in matrices
    )


@dataclass
class ExpertWeights:
    """A mixture-of-experts MLP: the router (experts, hidden), float32 as llama.cpp keeps it
    (it is small, and its ranking decides which experts run), and each expert's fused
    gate_up (2F, hidden) and down (hidden, F) in any format. An expert's matrices are views
    into the file when it is memory-mapped, so experts no token picks are never read.

    `stack()` makes each projection's experts views of one array per field with a leading
    expert axis (`stacked`: the same weight class over those arrays, an input of kernels
    only: its shape accessors do not apply), which the fused decode kernels index by
    expert; a checkpoint stores them so, and maps them back so.
    """

    router: DenseWeight
    gate_up: list[Weight]
    down: list[Weight]
    stacked: dict[str, Weight] | None = None

    def __post_init__(self) -> None:
        read_only(self.router.data)

    @property
    def count(self) -> int:
        return len(self.gate_up)

    def expert_nbytes(self, e: int) -> int:
        return self.gate_up[e].nbytes + self.down[e].nbytes

    def expert_arrays(self, e: int) -> dict[str, np.ndarray]:
        """Expert e's arrays as "gate_up.data", "down.scale", ...: what a device copies in to
        run it (`with_arrays` puts the copies back in its weights)."""
        return {
            f"{proj}.{field.name}": value
            for proj in ("gate_up", "down")
            for field in dataclasses.fields(getattr(self, proj)[e])
            if isinstance(value := getattr(getattr(self, proj)[e], field.name), np.ndarray)
        }

    def with_arrays(self, e: int, arrays: dict[str, Any]) -> tuple[Weight, Weight]:
        """Expert e's (gate_up, down) over `arrays` named as `expert_arrays` names them
        (device copies, say), each of its own class."""
        return tuple(
            dataclasses.replace(
                getattr(self, proj)[e],
                **{k.split(".", 1)[1]: a for k, a in arrays.items() if k.startswith(proj + ".")},
            )
            for proj in ("gate_up", "down")
        )

    @property
    def nbytes(self) -> int:
        return self.router.nbytes + sum(self.expert_nbytes(e) for e in range(self.count))

    def stack(self) -> None:
        """Fill `stacked` for the projections whose experts share a class and layout (a
        view when the experts already lie at equal strides in one array, as a checkpoint
        maps them; else a copy, each expert then a view of it)."""
        if self.stacked is not None:
            return
        self.stacked, copied = {}, False
        for name in ("gate_up", "down"):
            experts = getattr(self, name)
            fields = _stackable_fields(experts)
            if fields is None:
                continue
            arrays = {f: _stacked_array([getattr(w, f) for w in experts]) for f in fields}
            copied = copied or any(a.flags.owndata for a in arrays.values())
            self.stacked[name] = dataclasses.replace(experts[0], **arrays)
            for e, w in enumerate(experts):
                experts[e] = dataclasses.replace(w, **{f: a[e] for f, a in arrays.items()})
        if copied:
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS. The experts just copied were allocated
    on the heap (glibc raises its mmap threshold after freeing large blocks), and freeing
    them would otherwise leave a model's worth of them counted in the process's memory."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _glibc()


def _stackable_fields(experts: list[Weight]) -> tuple[str, ...] | None:
    """The array fields of weights that can be stacked (one class, equal shapes and
    dtypes, no biases), or None."""
    first = experts[0]
    if type(first) not in (Int8Weight, BlockWeight) or first.bias is not None:
        return None
    fields = ("data", "scale") if type(first) is Int8Weight else BLOCK_ARRAYS
    fields = tuple(f for f in fields if getattr(first, f) is not None)

    def layout(w: Weight) -> tuple:
        arrays = [getattr(w, f) for f in fields]
        extra = w.layout() + (w.kind, w.out_features) if type(w) is BlockWeight else ()
        if any(a is None for a in arrays) or w.bias is not None:
            return (None,)
        return (type(w), *((a.shape, a.dtype.str) for a in arrays), *extra)

    same = all(layout(w) == layout(first) for w in experts)
    return fields if same else None


def _root(a: np.ndarray) -> object:
    """The object owning an array's memory (a mapped file, or the array itself)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def _stacked_array(parts: list[np.ndarray]) -> np.ndarray:
    """The parts as one read-only array with a leading axis: a view when they already lie
    at one stride in one buffer, a copy otherwise."""
    first = parts[0]
    starts = [p.__array_interface__["data"][0] for p in parts]
    stride = starts[1] - starts[0] if len(parts) > 1 else first.nbytes
    contiguous = all(p.flags.c_contiguous for p in parts)
    root = _root(first)
    if (
        contiguous
        and stride >= first.nbytes
        and all(b - a == stride for a, b in itertools.pairwise(starts))
        and all(_root(p) is root for p in parts)
    ):
        view = np.lib.stride_tricks.as_strided(
            first, (len(parts), *first.shape), (stride, *first.strides), writeable=False
        )
        return view
    stacked = np.stack(parts)
    stacked.setflags(write=False)
    return stacked


@dataclass
class LayerWeights:
    """One decoder block. Q/K/V and gate/up are fused so a layer costs few linear calls. A
    mixture-of-experts layer has `experts` instead of gate_up and down (None)."""

    attn_norm: np.ndarray
    qkv: Weight
    o_proj: Weight
    ffn_norm: np.ndarray
    gate_up: Weight | None
    down: Weight | None
    experts: ExpertWeights | None = None
    q_norm: np.ndarray | None = None  # (head_dim,) per-head norms of q and k (qwen3)
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # (hidden,) on the attention's output (gemma3)
    post_ffn_norm: np.ndarray | None = None  # (hidden,) on the MLP's output

    def __post_init__(self) -> None:
        read_only(*(getattr(self, name) for name in LAYER_NORMS))

    def linears(self) -> list[tuple[str, Weight]]:
        """(name, weight) of every matrix a quantizer may convert: qkv, o_proj, and gate_up
        and down, or each expert's as "experts.E.gate_up" and "experts.E.down" (the router
        stays float32)."""
        found = [(name, getattr(self, name)) for name in LAYER_LINEARS]
        if self.experts is not None:
            found = found[:2] + [
                (f"experts.{e}.{name}", getattr(self.experts, name)[e])
                for e in range(self.experts.count)
                for name in ("gate_up", "down")
            ]
        return found

    def set_linear(self, name: str, weight: Weight) -> None:
        """Replace the matrix `linears()` calls `name`."""
        if name.startswith("experts."):
            _, e, field = name.split(".")
            getattr(self.experts, field)[int(e)] = weight
            self.experts.stacked = None
        else:
            setattr(self, name, weight)

    @property
    def nbytes(self) -> int:
        linears = sum(w.nbytes for _, w in self.linears())
        router = 0 if self.experts is None else self.experts.router.nbytes
        norms = (getattr(self, name) for name in LAYER_NORMS)
        return sum(n.nbytes for n in norms if n is not None) + linears + router


@dataclass
class ModelWeights:
    embed: Weight  # (vocab, hidden), looked up by row
    layers: Sequence[LayerWeights]  # a list, or an offload.LayerStream when streaming
    final_norm: np.ndarray
    lm_head: Weight  # the same object as `embed` when embeddings are tied

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + self.final_norm.nbytes
        if self.lm_head is not self.embed:
            total += self.lm_head.nbytes
        return total + sum(layer.nbytes for layer in self.layers)
