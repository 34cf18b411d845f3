"""Time spent inside backend kernels, so the bench can report per-token overhead outside them."""

from __future__ import annotations

import time
from typing import Any

KERNEL_METHODS = ("embed", "rmsnorm", "linear", "rope", "attention", "silu_mul")


class KernelTimer:
    """Wraps a backend instance's kernel methods with perf_counter accounting."""

    def __init__(self, backend: Any) -> None:
        self.seconds = 0.0
        self.calls = 0
        for name in KERNEL_METHODS:
            setattr(backend, name, self._timed(getattr(backend, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return wrapper

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0
