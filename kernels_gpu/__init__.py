"""numba.cuda twins of the kernels_cpu op set, for the CUDA backend.

Every op is a `cuda.jit` kernel plus a small host-side wrapper in the same module. Wrappers
take device arrays (numba DeviceNDArray), allocate their result on the device unless `out` is
given, and launch on `stream`; nothing is copied back to the host. Passing numpy arrays also
works but makes numba copy them in and out around every launch.

The kernels are plain CUDA: shared-memory tiles, block reductions through shared memory,
and warp reductions by shuffles (warp.py, which gives numba's CUDA simulator, the
NUMBA_ENABLE_CUDASIM=1 that runs them in CI on machines without a GPU, the shuffle it
lacks). Modules: matmul_f32 and matmul_int8 (GEMV/GEMM, with bias and residual in
their epilogue), norms (and the int8 activation quantisation), rope (the QKV split with its
rotation), activations, elementwise (residual add, scale, soft cap), embedding (row
gathers), paged_attention, moe (an expert's routing weights, and its rows added back into
the residual), and launch
(launch geometry, result buffers, and the conventions the kernels follow and why).
"""

from __future__ import annotations

from kernels_cpu import jit_cache

jit_cache.configure()  # before any module of the package defines a cached kernel


def simulated() -> bool:
    """Whether numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct, but every
    thread is a Python thread, so it is for tests, never a device to choose for speed."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def available() -> bool:
    """Whether numba finds a usable CUDA GPU (the simulator counts as one); never raises."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver or toolkit means "no GPU"
        return False
