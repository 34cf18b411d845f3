"""`lamina bench serve`: many streaming clients against `lamina serve`, and llama.cpp's server.

Each server runs in its own process, as users run it; the clients are raw HTTP streams on one
asyncio loop in this process (lighter than the openai client, so they steal less CPU from the
server on a 2-core machine). Figures, each a median over --runs:
- single_tok_s: one client alone, generated tokens / request time;
- aggregate_tok_s: N clients at once, all generated tokens / wall time from first request to
  last token; the ratio of the two is what continuous batching buys;
- ttft_p50_s / ttft_p99_s: time to the first streamed token, over every client of every run.
Both servers get the same prompts with the end-of-sequence token banned through logit_bias,
so every request generates exactly max_tokens tokens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.llama_cpp import build_tools, server_command
from bench.peers import installed, llama_cpp_gguf
from kernels_cpu.jit_cache import cache_dir

MODEL_NAME = "bench"
STORY = "Write a long story about {}. Begin with the morning and end at night."
TOPICS = [
    "a lighthouse keeper", "a baker in Lyon", "a lost satellite", "two chess rivals",
    "a river pilot", "a clockmaker", "a desert botanist", "a night-shift nurse",
]  # fmt: skip


def run_serve_bench(
    path: Path,
    quant: str | None,
    runs: int,
    peers: list[str],
    clients: int = 32,
    gen: int = 64,
    kv_cache_dtype: str = "float32",
) -> dict:
    """lamina's server figures and, with the llama.cpp peer, llama-server's on the same
    weights (Q8_0 from llama-quantize for int8), with one slot per client."""
    from engine.loader.model_loader import load_model

    eos = load_model(path, "int8").config.eos_token_ids
    prompts = [STORY.format(TOPICS[i % len(TOPICS)]) + f" (version {i})" for i in range(clients)]
    body = {"max_tokens": gen, "temperature": 0, "logit_bias": {str(t): -100 for t in eos}}
    command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(path)]
    command += ["--quant", quant or "f32", "--max-num-seqs", str(clients)]
    command += ["--kv-cache-dtype", kv_cache_dtype, "--served-model-name", MODEL_NAME]
    result = {
        "kind": "serve",
        "model": path.name,
        "quant": quant or "f32",
        "kv_cache_dtype": kv_cache_dtype,
        "clients": clients,
        "gen_tokens": gen,
        "runs": runs,
        **_measure(command, prompts, body, runs),
        "peers": {},
        "peers_skipped": [],
    }
    result["aggregate_vs_single"] = result["aggregate_tok_s"] / result["single_tok_s"]
    if "llama.cpp" in peers and installed("llama.cpp"):
        gguf = llama_cpp_gguf(path, quant, cache_dir())
        # One slot per client (-np), each with room for its prompt and reply.
        peer, env = server_command(build_tools(), gguf, MODEL_NAME, clients, 512)
        figures = _measure(peer, prompts, body, runs, env)
        figures["aggregate_vs_single"] = figures["aggregate_tok_s"] / figures["single_tok_s"]
        result["peers"]["llama.cpp"] = figures
        result["aggregate_tok_s_vs_llama.cpp"] = (
            result["aggregate_tok_s"] / figures["aggregate_tok_s"]
        )
    elif "llama.cpp" in peers:
        result["peers_skipped"].append("llama.cpp (cmake and ninja from PyPI are needed)")
    return result


def _measure(
    command: list[str], prompts: list[str], body: dict, runs: int, env: dict | None = None
) -> dict:
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        cmd = [*command, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            load_s = _wait_healthy(proc, url, log)
            figures = asyncio.run(_clients(url, prompts, body, runs))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"server_start_s": load_s, **figures}


async def _clients(url: str, prompts: list[str], body: dict, runs: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _stream(client, prompts[0], {**body, "max_tokens": 4})  # warm-up
        single, aggregate, ttfts, failures, tokens_per_client = [], [], [], 0, []
        for _ in range(runs):  # one client, then all, in turns: a swing in speed hits both
            start = time.perf_counter()
            tokens, _ = await _stream(client, prompts[0], body)
            single.append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            done = await asyncio.gather(
                *(_stream(client, p, body, start) for p in prompts), return_exceptions=True
            )
            wall = time.perf_counter() - start
            ok = [d for d in done if not isinstance(d, BaseException)]
            failures += len(done) - len(ok)
            ttfts += [ttft for _, ttft in ok]
            tokens_per_client += [tokens for tokens, _ in ok]
            aggregate.append(sum(tokens for tokens, _ in ok) / wall)
    ttfts.sort()
    return {
        "single_tok_s": statistics.median(single),
        "aggregate_tok_s": statistics.median(aggregate),
        "ttft_p50_s": _percentile(ttfts, 0.50),
        "ttft_p99_s": _percentile(ttfts, 0.99),
        "failures": failures,
        "min_tokens_per_client": min(tokens_per_client, default=0),
    }


async def _stream(
    client: httpx.AsyncClient, prompt: str, body: dict, start: float | None = None
) -> tuple[int, float]:
    """Stream one completion; return (tokens, seconds from `start` to the first token).

    A stream that stops for "length" generated exactly max_tokens tokens (the end-of-sequence
    token is banned); otherwise tokens are counted one per chunk with text.
    """
    start = time.perf_counter() if start is None else start
    payload = {**body, "model": MODEL_NAME, "prompt": prompt, "stream": True}
    ttft, chunks, finished, reason = None, 0, False, None
    async with client.stream("POST", "/v1/completions", json=payload) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                finished = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0] if chunk["choices"] else {}
            reason = choice.get("finish_reason") or reason
            if choice.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    if not finished or ttft is None:
        raise RuntimeError("the stream ended without [DONE] or without any token")
    return (body["max_tokens"] if reason == "length" else chunks), ttft


def _wait_healthy(proc: subprocess.Popen, url: str, log, timeout: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()[-2000:].decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
