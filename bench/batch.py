"""`lamina bench --batch`: what continuous batching buys, measured in one run.

- batch curve: aggregate decode tok/s of 1, 2, 4, ... 32 sequences decoding together;
- shared prefix: time to first token of a request whose 512-token prefix is already cached,
  against the first request that computed it;
- batch job: a mixed-length workload (like a JSONL job) through the scheduler, with the KV
  memory wasted by block granularity sampled every step, against llama-cpp-python running
  the same prompts one after another (its Python API generates one sequence at a time).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench.peers import installed, llama_cpp_gguf
from kernels_cpu.jit_cache import cache_dir

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
CURVE_PROMPT, CURVE_GEN = 32, 64
PREFIX_TOKENS = 512
JOB_PROMPTS = 32
JOB_PROMPT_RANGE = (16, 384)
JOB_GEN_RANGE = (16, 96)


def run_batch_bench(
    path: Path, quant: str | None, runs: int, peers: list[str], kv_cache_dtype: str = "float32"
) -> dict:
    from engine import LLM

    llm = LLM(
        path,
        quant=quant,
        max_model_len=1024,
        max_num_seqs=max(BATCH_SIZES),
        kv_cache_dtype=kv_cache_dtype,
    )
    vocab = llm.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    result: dict = {"quant": quant or "f32", "kv_cache_dtype": kv_cache_dtype, "runs": runs}
    _warm_up(llm)
    samples: dict[int, list[float]] = {b: [] for b in BATCH_SIZES}
    for _ in range(runs):  # sizes take turns, so a swing in the machine's speed hits all
        for b in BATCH_SIZES:
            samples[b].append(_decode_tok_s(llm, b, rng, vocab))
    curve = {b: statistics.median(v) for b, v in samples.items()}
    result["batch_curve_decode_tok_s"] = {str(b): v for b, v in curve.items()}
    result["batch16_vs_single"] = curve[16] / curve[1]
    cold, warm = zip(*(_prefix_ttft(llm, rng, vocab) for _ in range(runs)), strict=True)
    result["prefix_cold_ttft_s"] = statistics.median(cold)
    result["prefix_warm_ttft_s"] = statistics.median(warm)
    result["prefix_ttft_speedup"] = result["prefix_cold_ttft_s"] / result["prefix_warm_ttft_s"]
    jobs = _job(rng, vocab)
    result.update(_run_job(llm, jobs))
    result["peers"], result["peers_skipped"] = {}, []
    if "llama.cpp" in peers and installed("llama.cpp") and installed("llama-cpp-python"):
        cache = cache_dir() / f"gguf-{path.stem if path.is_file() else path.name}"
        cache.mkdir(parents=True, exist_ok=True)
        figures = _llama_cpp_job(llama_cpp_gguf(path, quant, cache), jobs)
        result["peers"]["llama.cpp"] = figures
        result["job_gen_tok_s_vs_llama.cpp"] = result["job_gen_tok_s"] / figures["job_gen_tok_s"]
    elif "llama.cpp" in peers:
        result["peers_skipped"].append("llama.cpp (not installed)")
    return result


def _warm_up(llm) -> None:
    from engine import SamplingParams

    llm.generate([[1, 2, 3]] * 8 + [list(range(40))], SamplingParams(max_tokens=4))


def _random_prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(100, vocab, size=n).tolist()


def _decode_tok_s(llm, batch: int, rng: np.random.Generator, vocab: int) -> float:
    """Aggregate decode speed: tokens after each sequence's first, over the time when all
    sequences were decoding (every request is submitted at once, so they share a start)."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=CURVE_GEN, temperature=0, ignore_eos=True)
    prompts = [_random_prompt(rng, vocab, CURVE_PROMPT) for _ in range(batch)]
    outputs = llm.generate(prompts, params)
    start = max(o.metrics.ttft_s for o in outputs)
    end = max(o.metrics.total_s for o in outputs)
    return sum(o.metrics.generated_tokens - 1 for o in outputs) / (end - start)


def _prefix_ttft(llm, rng: np.random.Generator, vocab: int) -> tuple[float, float]:
    """TTFT of a request with a fresh 512-token prefix, then of one that shares the prefix."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    prefix = _random_prompt(rng, vocab, PREFIX_TOKENS)
    first = llm.generate(prefix + _random_prompt(rng, vocab, 16), params)[0]
    second = llm.generate(prefix + _random_prompt(rng, vocab, 16), params)[0]
    assert second.metrics.cached_prompt_tokens >= PREFIX_TOKENS - 16
    return first.metrics.ttft_s, second.metrics.ttft_s


def _job(rng: np.random.Generator, vocab: int) -> list[tuple[list[int], int]]:
    lo, hi = JOB_PROMPT_RANGE
    glo, ghi = JOB_GEN_RANGE
    return [
        (_random_prompt(rng, vocab, int(rng.integers(lo, hi))), int(rng.integers(glo, ghi)))
        for _ in range(JOB_PROMPTS)
    ]


def _run_job(llm, jobs: list[tuple[list[int], int]]) -> dict:
    """The workload through the scheduler, sampling KV usage after every step."""
    from engine import SamplingParams

    engine = llm._engine
    used = allocated = 0
    step = engine.step

    def sampled_step() -> None:
        nonlocal used, allocated
        step()
        u, a = engine.cache.usage()
        used, allocated = used + u, allocated + a

    engine.step = sampled_step
    try:
        params = [SamplingParams(max_tokens=g, temperature=0, ignore_eos=True) for _, g in jobs]
        t0 = time.perf_counter()
        outputs = llm.generate([p for p, _ in jobs], params)
        wall = time.perf_counter() - t0
    finally:
        del engine.step
    generated = sum(o.metrics.generated_tokens for o in outputs)
    return {
        "job_requests": len(jobs),
        "job_prompt_tokens": sum(len(p) for p, _ in jobs),
        "job_generated_tokens": generated,
        "job_wall_s": wall,
        "job_gen_tok_s": generated / wall,
        "job_preemptions": engine.scheduler.num_preemptions,
        "kv_waste": 1 - used / allocated,
    }


def _llama_cpp_job(gguf_path: Path, jobs: list[tuple[list[int], int]]) -> dict:
    """The same prompts through llama-cpp-python, one after another, greedy."""
    import os

    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    generated = 0
    t0 = time.perf_counter()
    for prompt, gen in jobs:
        tokens = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        for _ in range(gen):
            next(tokens)
        generated += gen
    wall = time.perf_counter() - t0
    return {"weights": gguf_path.name, "job_wall_s": wall, "job_gen_tok_s": generated / wall}
