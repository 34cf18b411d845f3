"""Launch geometry and result buffers shared by the host-side wrappers, and kernel conventions.

Conventions of the kernels, shaped by numba's CUDA simulator (which runs them in CI) and by
numba 0.68's built-in CUDA target:
- Warp reductions by shuffles (warp.py, which lends the simulator the shuffle it lacks: every
  thread of a block must reach each shuffle). A block reduction across warps stores one
  partial per thread in shared memory, waits at one barrier, and every thread then reads all
  partials (broadcast reads, no bank conflicts): one barrier instead of a tree of
  log2(threads), no broadcast step.
- No builtin min/max in kernels: the built-in target fails to compile their varargs overloads.
  Conditional expressions instead.
- Device functions that use `cuda.*` live in the module of the kernels that call them: the
  simulator swaps a device function's module globals per call, racing between threads when
  that module is not the kernel's own.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

# Threads per block of the elementwise kernels, and the most blocks they launch: beyond that
# each thread loops (grid-stride), which keeps the launch small for big arrays.
ELEMENTWISE_THREADS = 128
MAX_BLOCKS = 4096
# Threads of the kernels where one block owns one row of hidden-size length (norms,
# activation quantisation): 4 warps, so a decode step's single row still has 128 loads in flight.
ROW_THREADS = 128


def elementwise_grid(n: int) -> int:
    """Blocks for a grid-stride kernel over n elements (at least one)."""
    return max(1, min(MAX_BLOCKS, -(-n // ELEMENTWISE_THREADS)))


def result(out, shape: tuple[int, ...], dtype: type, stream=0):
    """`out` after checking it fits, else a new uninitialised device array."""
    if out is None:
        return cuda.device_array(shape, dtype=dtype, stream=stream)
    if tuple(out.shape) != tuple(shape) or out.dtype != np.dtype(dtype):
        raise ValueError(f"out is {out.dtype}{tuple(out.shape)}, needs {np.dtype(dtype)}{shape}")
    return out


_EMPTY: dict[tuple[int, str], object] = {}


def empty(ndim: int = 1, dtype: type = np.float32):
    """An empty device array of `ndim` dimensions, made once and shared: an argument a
    launch does not read (numba cannot pass None to a kernel on a real GPU), so a warm step
    calls the allocator for nothing. `dtype` only where the kernel's code types it (bit
    operations compile for integers only)."""
    key = (ndim, np.dtype(dtype).str)
    if key not in _EMPTY:
        _EMPTY[key] = cuda.device_array((0,) * ndim, dtype=dtype)
    return _EMPTY[key]


def no_scale():
    """`empty()`: kernels read `scale.size == 0` as "not quantised"."""
    return empty(1)
