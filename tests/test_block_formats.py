"""Block formats: GGUF's quantized types repacked exactly, and the 4-bit / 8-bit block kernels.

Each GGUF type is written by the `gguf` package into a real file, loaded by lamina in its
own quantization, and dequantized: the bits must equal gguf's numpy dequantizer. The block
matmul is checked against numpy (the activations rounded per 32 inputs as the kernel does,
the products in float64), batched against one token at a time bit for bit, and its SIMD
step against the instruction each kind is meant to emit.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir

from engine.errors import UnsupportedModelError
from engine.loader.gguf_blocks import BLOCK_BYTES, check_supported, dequantize, repack
from engine.quant.int4 import quantize_int4
from engine.weights import DenseWeight
from kernels_cpu import simd, simd_blocks
from kernels_cpu.matmul_blocks import KIND, matmul_blocks, padded_inputs
from tests.test_simd import assembly_for

# Byte offsets of each type's float16 fields, set to finite values in random blocks.
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, blocks: int) -> np.ndarray:
    """(rows, blocks * block bytes) of random bytes with finite float16 scales."""
    nbytes, _ = BLOCK_BYTES[type_name]
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        halves = (rng.standard_normal((rows, blocks, 1)) * 0.05).astype(np.float16)
        raw[:, :, at : at + 2] = halves.view(np.uint8)
    return raw.reshape(rows, blocks * nbytes)


@pytest.mark.parametrize("type_name", list(BLOCK_BYTES))
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gguf_types_repack_bit_exactly(tmp_path_factory, type_name, rows, blocks, seed):
    """Written by gguf's writer, read by gguf's reader, repacked by lamina: dequantizing
    gives gguf's own float32 bits."""
    rng = np.random.default_rng(seed)
    raw = random_blocks(rng, type_name, rows, blocks)
    qtype = gguf.GGMLQuantizationType[type_name]
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    k = int(tensor.shape[0])
    stored = np.asarray(tensor.data).reshape(rows, -1)
    want = gguf_dequantize(stored, qtype).reshape(rows, k)
    assert np.array_equal(dequantize(repack(type_name, stored, k)), want)


def test_an_unsupported_type_names_the_nearest_supported_one():
    with pytest.raises(UnsupportedModelError, match="Q2_K.*Q4_K"):
        check_supported("Q2_K", "'blk.0.attn_q.weight'")


def quantized_activations(x: np.ndarray, kp: int) -> np.ndarray:
    """x (T, K) as the kernels round it: int8 per 32 inputs, scale max|x| / 127, times the
    scale, in float64 (T, kp)."""
    padded = np.zeros((x.shape[0], kp), np.float32)
    padded[:, : x.shape[1]] = x
    blocks = padded.reshape(x.shape[0], kp // 32, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    scale = amax / np.float32(127)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv)
    return (q.astype(np.float64) * scale.astype(np.float64)).reshape(x.shape[0], kp)


def block_weight(rng: np.random.Generator, fmt: str, n: int, k: int):
    """A BlockWeight of lamina's int4 (any k) or of a GGUF type (k a multiple of its block)."""
    if fmt.startswith("int4"):
        data = rng.standard_normal((n, k)).astype(np.float32)
        return quantize_int4(DenseWeight(data), int(fmt.split("-g")[1]))
    _, cols = BLOCK_BYTES[fmt]
    blocks = -(-k // cols)
    return repack(fmt, random_blocks(rng, fmt, n, blocks), blocks * cols)


BLOCK_FORMATS = ["int4-g32", "int4-g64", "int4-g128", *BLOCK_BYTES]


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(BLOCK_FORMATS),
    tokens=st.sampled_from([1, 2, 5, 17]),
    n=st.sampled_from([1, 3, 17, 40]),
    k=st.sampled_from([1, 17, 64, 300, 4097]),
    seed=st.integers(0, 2**16),
)
def test_blocks_matmul_matches_numpy(fmt, tokens, n, k, seed):
    """Every format, through the GEMV (1-2 tokens) and the GEMM tiles (4 x 4 and edges),
    against float64 numpy on the same rounded activations: only the kernel's float32
    accumulation differs."""
    rng = np.random.default_rng(seed)
    w = block_weight(rng, fmt, n, k)
    k = w.in_features
    x = (rng.standard_normal((tokens, k)) * 3).astype(np.float32)
    got = matmul_blocks(x, *w.kernel_arrays, k, n)
    kp = padded_inputs(w.scale, w.group)
    w_ref = np.zeros((n, kp))
    w_ref[:, :k] = dequantize(w)
    xq = quantized_activations(x, kp)
    want = xq @ w_ref.T
    bound = 1e-5 * (np.abs(xq) @ np.abs(w_ref).T) + 1e-30
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(BLOCK_FORMATS), tokens=st.integers(3, 12), seed=st.integers(0, 99))
def test_blocks_batched_rows_equal_one_by_one(fmt, tokens, seed):
    """A token's output does not depend on its batch: GEMM tiles give the GEMV's bits."""
    rng = np.random.default_rng(seed)
    w = block_weight(rng, fmt, 21, 512)
    x = rng.standard_normal((tokens, w.in_features)).astype(np.float32)
    batched = matmul_blocks(x, *w.kernel_arrays, w.in_features, 21)
    for t in range(tokens):
        alone = matmul_blocks(x[t : t + 1], *w.kernel_arrays, w.in_features, 21)
        assert np.array_equal(batched[t : t + 1], alone)


def test_blocks_matmul_refuses_mismatched_scratch():
    rng = np.random.default_rng(0)
    w = block_weight(rng, "Q8_0", 4, 64)
    with pytest.raises(ValueError, match="x does not match"):
        matmul_blocks(np.zeros((1, 32), np.float32), *w.kernel_arrays, 64, 4)


def _step_assembly(kind: str, bits: int, cpu: str) -> str:
    """The machine code of one multiply step (64 bytes of weights), compiled for `cpu`."""
    module = ir.Module(name="step")
    v64 = ir.VectorType(ir.IntType(8), 64)
    v16 = ir.VectorType(ir.IntType(32), 16)
    fn_type = ir.FunctionType(ir.VoidType(), [v16.as_pointer(), v64.as_pointer(), v64.as_pointer()])
    fn = ir.Function(module, fn_type, name="step")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    acc, w, x = (builder.load(arg) for arg in fn.args)
    builder.store(simd_blocks._int_dot(builder, kind, bits, acc, w, x), fn.args[0])
    builder.ret_void()
    return assembly_for(module, cpu)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("kind", "cpu", "instructions"),
    [
        ("avx512vnni", "icelake-server", ["vpdpbusd"]),
        ("avx512bw", "skylake-avx512", ["vpmaddubsw", "vpmaddwd"]),
        ("avx2", "haswell", ["vpmaddubsw", "vpmaddwd"]),
    ],
)
def test_block_steps_compile_to_their_instructions(bits, kind, cpu, instructions):
    assembly = _step_assembly(kind, bits, cpu)
    for instruction in instructions:
        assert instruction in assembly
    if bits == 8 and kind != "avx512vnni":
        assert "vpsignb" in assembly  # 8-bit weights take the sign trick


def test_the_block_kernels_use_the_kind_in_use():
    assert KIND == simd.host_kind()
