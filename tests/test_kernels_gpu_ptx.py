"""The CUDA kernels as a GPU compiles them, on a machine without one: PTX for an H100/H200
(compute capability 9.0) from numba's CUDA target and the CUDA toolkit's libnvvm.

The simulator runs the kernels' Python, not their compiled form, so this is where the
constructs it cannot run are checked: the warp shuffles of the GEMV reductions (the
simulator gets a stand-in) with no barrier left in them, the block GEMV's float16 scales
converted by the hardware and its fused multiply-adds, and the QKV split writing into a
paged cache. Skipped, with the reason, where libnvvm is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Compiled in a child process: this one runs numba's simulator (conftest.py). With no GPU
# there, numba's dispatcher asks the driver for the device's compute capability when it
# compiles a device function; the child answers 9.0 instead.
_COMPILE = r"""
import json, types
from numba.cuda import compiler, dispatcher
from numba.cuda.cudadrv import nvvm

if not nvvm.is_available():
    print(json.dumps({"skip": "libnvvm (the CUDA toolkit's NVVM) is not installed"}))
    raise SystemExit
device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
dispatcher.get_current_device = compiler.get_current_device = device
from numba import cuda
from kernels_gpu.matmul_blocks import _gemv_blocks
from kernels_gpu.matmul_f32 import _gemv
from kernels_gpu.matmul_int8 import _gemv_int
from kernels_gpu.rope import _split_rope

M, V = "float32[:, ::1]", "float32[::1]"
SIGNATURES = {
    "gemv_int": (_gemv_int, f"void(int16[:, ::1], {V}, int32[:, ::1], {V}, {V}, {M}, boolean)"),
    "gemv_f32": (_gemv, f"void({M}, {M}, {V}, {V}, {M}, boolean)"),
    "gemv_int4": (_gemv_blocks, "void(int32[:, ::1], int32[:, ::1], int64, float16[:, ::1], "
                  f"{M}, {M}, {M}, int64, int64, int32[:, ::1], int32[:, ::1], {M}, {M}, {V}, "
                  f"{M}, boolean)"),
    "split_rope": (_split_rope, f"void({M}, int64[::1], {V}, float32[:, :, ::1], "
                   "float32[:, :, :, ::1], float32[:, :, :, ::1], int64[::1], boolean)"),
}
ptx = {name: cuda.compile_ptx(f.py_func, sig, cc=(9, 0))[0] for name, (f, sig) in SIGNATURES.items()}
print(json.dumps({"ptx": ptx}))
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _COMPILE], check=False, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["ptx"]


@pytest.mark.parametrize("kernel", ["gemv_int", "gemv_f32"])
def test_gemv_rows_are_summed_by_warp_shuffles_without_barriers(ptx, kernel):
    assert "shfl.sync.bfly.b32" in ptx[kernel]
    assert "bar.sync" not in ptx[kernel]


def test_int4_gemv_converts_float16_scales_in_hardware_and_fuses_its_multiply_adds(ptx):
    code = ptx["gemv_int4"]
    assert "cvt.f32.f16" in code
    assert "fma.rn.f32" in code
    assert "ld.global.u32" in code or "ld.global.nc.u32" in code  # values read as words


def test_the_qkv_split_compiles_for_a_paged_cache(ptx):
    assert "st.global.f32" in ptx["split_rope"]
