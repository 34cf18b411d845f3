"""Numba-compiled CPU kernels: pure functions on numpy arrays, no engine imports.

Ops that produce an array come in two forms: `op_into(..., out, [scratch])`, which writes
a caller's buffers and allocates nothing (what a warm decode step runs), and `op(...)`,
which allocates its result and scratch and calls the first (tests, one-off calls).
"""

from kernels_cpu import jit_cache

jit_cache.configure()  # before any module below defines a cached kernel

from kernels_cpu.activations import silu_mul, silu_mul_into
from kernels_cpu.norms import rmsnorm, rmsnorm_into
from kernels_cpu.rope import rope_angles_into, rope_heads
from kernels_cpu.rows import add_bias_inplace, masked_copy_into, put_rows, take_rows_into

__all__ = [
    "add_bias_inplace",
    "masked_copy_into",
    "put_rows",
    "rmsnorm",
    "rmsnorm_into",
    "rope_angles_into",
    "rope_heads",
    "silu_mul",
    "silu_mul_into",
    "take_rows_into",
]
