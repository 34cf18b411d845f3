"""lamina: a CPU-first LLM inference engine.

The public surface is `LLM` and `SamplingParams`; they are imported lazily so that
`import engine.sampling` (or the CLI's `--help`) does not pay for numba compilation.
"""

from typing import Any

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from engine import api

        return getattr(api, name)
    if name == "SamplingParams":
        from engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
