"""The engines users would otherwise pick, measured on the same weights in the same run."""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

from bench.gguf_export import export_gguf, quantize_gguf_q8_0
from engine.loader.default_model import default_model_path


def installed(peer: str) -> bool:
    module = {"llama.cpp": "llama_cpp", "transformers": "transformers"}[peer]
    return importlib.util.find_spec(module) is not None


def llama_cpp_gguf(model_path: Path, quant: str | None, cache: Path) -> Path:
    """The GGUF llama.cpp should run: Q8_0 of the same weights for an int8 comparison."""
    if model_path.is_dir():
        source = cache / "model-f16.gguf"
        if not source.exists():
            export_gguf(model_path, source, default_model_path(), half=True)
    else:
        source = model_path
    if quant != "int8":
        return source
    target = cache / f"{source.stem}-Q8_0.gguf"
    if not target.exists():
        quantize_gguf_q8_0(source, target)
    return target


def llama_cpp_figures(gguf_path: Path, ids: list[int], gen: int, runs: int) -> dict:
    """Prefill and decode with llama-cpp-python, greedy, timed like lamina (wall clock)."""
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    start = time.perf_counter()
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=len(ids) + gen + 16,
        n_batch=max(512, len(ids)),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    ttft, tpot = [], []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        tokens = llm.generate(ids, top_k=1, temp=0.0, reset=True)
        next(tokens)
        first = time.perf_counter() - t0
        for _ in range(gen - 1):
            next(tokens)
        ttft.append(first)
        tpot.append((time.perf_counter() - t0 - first) / (gen - 1))
    return _summary(load_s, ttft, tpot, len(ids), gguf_path.name)


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
