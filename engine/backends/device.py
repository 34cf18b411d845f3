"""Which device runs the model: `--device auto|cpu|cuda` and `LLM(device=...)`.

auto takes the GPU only when numba finds a real one. numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1) also counts as "available" to numba, but it runs every CUDA thread
as a Python thread: it exists to test the CUDA backend, so it is used only when asked for
by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import LaminaError

if TYPE_CHECKING:
    from engine.backends import Backend

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DeviceChoice:
    """The device that runs the model ("cpu" or "cuda") and why it was picked."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"device {self.name} ({self.reason})"


def select_device(requested: str = "auto") -> DeviceChoice:
    """Resolve a requested device; raise LaminaError for an unknown one, or for "cuda"
    when numba finds no GPU."""
    if requested not in DEVICES:
        raise LaminaError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "cpu":
        return DeviceChoice("cpu", "requested")
    import kernels_gpu  # only now: numba.cuda takes a moment to import and probe

    if kernels_gpu.simulated():
        if requested == "cuda":
            return DeviceChoice("cuda", "numba's CUDA simulator, NUMBA_ENABLE_CUDASIM=1: slow")
        return DeviceChoice("cpu", "auto: only numba's CUDA simulator is on")
    if kernels_gpu.available():
        return DeviceChoice("cuda", f"{requested}: {_gpu_name()}")
    if requested == "cuda":
        raise LaminaError(
            "device cuda was requested, but numba finds no usable CUDA GPU (no NVIDIA driver "
            "or no visible device); use device cpu or auto"
        )
    return DeviceChoice("cpu", "auto: numba finds no usable CUDA GPU")


def make_backend(device: str) -> Backend:
    """A fresh Backend for a device that `select_device` chose."""
    if device == "cpu":
        from engine.backends.cpu import CPUBackend

        return CPUBackend()
    if device == "cuda":
        from engine.backends.cuda import CUDABackend

        return CUDABackend()
    raise ValueError(f"no backend for device {device!r}")


def _gpu_name() -> str:
    from numba import cuda

    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)
