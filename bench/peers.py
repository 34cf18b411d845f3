"""The engines users would otherwise pick, measured on the same weights in the same run."""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

from bench.gguf_export import export_gguf
from bench.llama_cpp import build_tools, quantize, tools_built
from engine.loader.default_model import default_model_path


def installed(peer: str) -> bool:
    """Whether a peer can run here. llama.cpp: its tools are built (or can be, with cmake
    and ninja from PyPI); llama-cpp-python for the peers that still use it (batch, serve)."""
    if peer == "llama.cpp":
        buildable = all(importlib.util.find_spec(m) is not None for m in ("cmake", "ninja"))
        return buildable or tools_built()
    module = {"llama-cpp-python": "llama_cpp", "transformers": "transformers"}[peer]
    return importlib.util.find_spec(module) is not None


# The llama.cpp type a lamina precision is compared with: its own int8 and 4-bit types.
_PEER_TYPE = {"int8": "Q8_0", "int4": "Q4_0"}


def llama_cpp_gguf(model_path: Path, quant: str | None, cache: Path) -> Path:
    """The GGUF llama.cpp should run: for an int8 (int4) comparison, Q8_0 (Q4_0) of the same
    weights made by llama.cpp's own llama-quantize (a GGUF source is requantized from its own
    type); otherwise the model's own GGUF."""
    if quant not in _PEER_TYPE:
        return model_path if model_path.is_file() else _source_gguf(model_path, cache)
    return gguf_of_type(model_path, _PEER_TYPE[quant], cache)


def gguf_of_type(model_path: Path, qtype: str, cache: Path) -> Path:
    """The model as llama-quantize writes it in `qtype` (from an f16 export of a folder)."""
    source = _source_gguf(model_path, cache)
    return quantize(build_tools(), source, qtype, cache / f"{source.stem}-{qtype}.gguf")


def _source_gguf(model_path: Path, cache: Path) -> Path:
    if model_path.is_file():
        return model_path
    source = cache / "model-f16.gguf"
    if not source.exists():  # written aside and renamed: an interrupted export is no file
        partial = source.with_suffix(".partial")
        export_gguf(model_path, partial, default_model_path(), half=True)
        partial.rename(source)
    return source


def transformers_figures(model_path: Path, ids: list[int], gen: int, runs: int) -> dict:
    """transformers on torch CPU in float32 (its CPU default), greedy with its KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    kw = {"gguf_file": model_path.name} if model_path.is_file() else {}
    folder = model_path.parent if model_path.is_file() else model_path
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - start
    prompt = torch.tensor([ids])
    ttft, tpot = [], []
    with torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            first = time.perf_counter() - t0
            for _ in range(gen - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            ttft.append(first)
            tpot.append((time.perf_counter() - t0 - first) / (gen - 1))
    return _summary(load_s, ttft, tpot, len(ids), "float32")


def _summary(
    load_s: float, ttft: list[float], tpot: list[float], prompt: int, weights: str
) -> dict:
    t, p = statistics.median(ttft), statistics.median(tpot)
    return {
        "weights": weights,
        "load_s": load_s,
        "ttft_s": t,
        "tpot_s": p,
        "prefill_tok_s": prompt / t,
        "decode_tok_s": 1.0 / p,
    }
