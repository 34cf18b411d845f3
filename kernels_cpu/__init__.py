"""Numba-compiled CPU kernels: pure functions on numpy arrays, no engine imports."""

from kernels_cpu.activations import silu_mul
from kernels_cpu.norms import rmsnorm
from kernels_cpu.rope import rope_inplace

__all__ = ["rmsnorm", "rope_inplace", "silu_mul"]
