"""Time spent inside backend kernels, so the bench can report per-token overhead outside them."""

from __future__ import annotations

import time
from typing import Any

# Every Backend op that computes (engine/backends/__init__.py).
KERNEL_METHODS = (
    "embed", "linear", "norm_linear", "linear_add_", "attention", "take_rows", "moe_add_",
    "qk_norm_", "scale_", "glu", "norm_add_", "softcap_",
)  # fmt: skip


class KernelTimer:
    """Wraps a backend instance's kernel methods with perf_counter accounting: in total, and
    per op (linears per shape and format), for `lamina bench --profile`."""

    def __init__(self, backend: Any, per_op: bool = False) -> None:
        """per_op: also account each op apart (a key per call: for profiling only)."""
        self.seconds = 0.0
        self.calls = 0
        self.per_op: dict[str, list] = {}  # op -> [seconds, calls]
        self._by_op = per_op
        for name in KERNEL_METHODS:
            setattr(backend, name, self._timed(name, getattr(backend, name)))

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self.seconds += seconds
                self.calls += 1
                if self._by_op:
                    entry = self.per_op.setdefault(_op_key(name, args), [0.0, 0])
                    entry[0] += seconds
                    entry[1] += 1

        return wrapper

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.per_op.clear()


def _op_key(name: str, args: tuple) -> str:
    """The op's name, and for the linears the weight's shape and format."""
    weight = next((a for a in args if hasattr(a, "out_features")), None)
    if weight is None:
        return name
    return f"{name} {weight.out_features}x{weight.in_features} {type(weight).__name__}"
