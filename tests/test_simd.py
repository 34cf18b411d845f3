"""The SIMD dot-product tiles of kernels_cpu.simd, for every instruction kind.

Kinds the host can run are checked numerically against numpy; the AVX-512 kinds are
compiled for a CPU that has them and their assembly is checked for the intended instruction,
since CI machines may lack them.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from numba import njit

from kernels_cpu import simd

KIND_RANK = {kind: rank for rank, kind in enumerate(reversed(simd.KINDS))}
RUNNABLE = [k for k in simd.KINDS if KIND_RANK[k] <= KIND_RANK[simd.best_kind()]]
TILES = [(1, 1), (1, 2), (4, 1), (4, 2), (4, 4)]


def _tile_runner(kind: str, rows: int, tokens: int):
    dot = simd.make_dot_tile(kind, rows, tokens)

    @njit
    def run(w, r, a, t, k0, k1, sums):
        dot(w, r, a, t, k0, k1, sums)

    return run


RUNNERS = {(kind, tile): _tile_runner(kind, *tile) for kind in RUNNABLE for tile in TILES}


@pytest.mark.parametrize("kind", RUNNABLE)
@pytest.mark.parametrize("tile", TILES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_dot_tile_equals_numpy(kind, tile, data):
    rows, tokens = tile
    lanes = simd.lanes(kind)
    blocks = data.draw(st.integers(0, simd.KBLOCK // lanes), label="blocks")
    offset = data.draw(st.integers(0, 3), label="offset blocks")
    k = (blocks + offset + 1) * lanes + data.draw(st.integers(0, lanes - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    w = rng.integers(-127, 128, size=(rows + 3, k), dtype=np.int8)
    a = rng.integers(-32767, 32768, size=(tokens + 2, k)).astype(np.int16)
    r, t = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    k0 = offset * lanes
    k1 = k0 + blocks * lanes
    start = rng.integers(-(2**40), 2**40, size=(rows, tokens))
    sums = start.copy()
    RUNNERS[(kind, tile)](w, r, a, t, k0, k1, sums)
    ref = w[r : r + rows, k0:k1].astype(np.int64) @ a[t : t + tokens, k0:k1].astype(np.int64).T
    assert np.array_equal(sums, start + ref)


SCALED_TILES = [(4, 1), (4, 2), (4, 4)]


def _scaled_runner(kind: str, rows: int, tokens: int):
    tile = simd.make_scaled_tile(kind, rows, tokens)

    @njit
    def run(w, r, a, t, a_scale, scale, out, accumulate):
        tile(w, r, a, t, a_scale, scale, out, accumulate)

    return run


SCALED = {(kind, t): _scaled_runner(kind, *t) for kind in RUNNABLE for t in SCALED_TILES}


@pytest.mark.parametrize("kind", RUNNABLE)
@pytest.mark.parametrize("tile", SCALED_TILES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_scaled_tile_equals_numpy(kind, tile, data):
    """Every output of the tile lands on its own (token, row), scaled in float64 and rounded
    once, for every kind this machine runs (AVX2 has fewer int32 lanes than a 4x4 tile has
    outputs); extreme values show that the sums do not overflow."""
    rows, tokens = tile
    lanes = simd.lanes(kind)
    k = lanes * data.draw(st.integers(1, simd.KBLOCK // lanes), label="steps")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    w = rng.integers(-127, 128, size=(rows + 3, k), dtype=np.int8)
    a = rng.integers(-32767, 32768, size=(tokens + 2, k)).astype(np.int16)
    if data.draw(st.booleans(), label="extreme"):
        w[:], a[:] = -127, 32767
    r, t = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    a_scale = rng.random(tokens + 2, dtype=np.float32)
    scale = rng.random(rows + 3, dtype=np.float32)
    accumulate = data.draw(st.booleans(), label="accumulate")
    start = rng.standard_normal((tokens + 2, rows + 3)).astype(np.float32)
    out = start.copy()
    SCALED[(kind, tile)](w, r, a, t, a_scale, scale, out, accumulate)
    dots = w[r : r + rows].astype(np.int64) @ a[t : t + tokens].astype(np.int64).T
    both = a_scale[t : t + tokens, None].astype(np.float64) * scale[None, r : r + rows]
    values = (dots.T.astype(np.float64) * both).astype(np.float32)
    expect = start.copy()
    window = expect[t : t + tokens, r : r + rows]
    expect[t : t + tokens, r : r + rows] = window + values if accumulate else values
    assert np.array_equal(out, expect)


def test_extreme_values_do_not_overflow_within_a_block():
    kind = simd.host_kind()
    k = simd.KBLOCK
    w = np.full((1, k), -127, dtype=np.int8)  # the sum is far beyond int32
    a = np.full((1, k), 32767, dtype=np.int16)
    sums = np.zeros((1, 1), dtype=np.int64)
    RUNNERS[(kind, (1, 1))](w, 0, a, 0, 0, k, sums)
    assert sums[0, 0] == -127 * 32767 * k


def assembly_for(module: ir.Module, cpu: str) -> str:
    """The x86-64 machine code of an LLVM module, compiled for `cpu` (which the host may
    lack): how the SIMD paths this machine cannot run are checked."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    machine = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(cpu=cpu)
    return machine.emit_assembly(parsed)


def _assembly(kind: str, cpu: str) -> str:
    module = ir.Module(name="dot")
    i64 = ir.IntType(64)
    fn_type = ir.FunctionType(
        ir.IntType(64), [ir.IntType(8).as_pointer(), ir.IntType(16).as_pointer(), i64]
    )
    fn = ir.Function(module, fn_type, name="dot")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    (dot,) = simd.emit_dot_tile(builder, kind, [fn.args[0]], [fn.args[1]], i64(0), fn.args[2])
    builder.ret(dot)
    return assembly_for(module, cpu)


@pytest.mark.parametrize(
    ("kind", "cpu", "instruction"),
    [
        ("avx512vnni", "icelake-server", "vpdpwssd"),
        ("avx512bw", "skylake-avx512", "vpmaddwd"),
        ("avx2", "haswell", "vpmaddwd"),
    ],
)
def test_each_kind_compiles_to_its_instruction(kind, cpu, instruction):
    assembly = _assembly(kind, cpu)
    assert instruction in assembly
    assert ("zmm" in assembly) == kind.startswith("avx512")
