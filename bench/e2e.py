"""End-to-end figures on the default model (f32): load, compile, prefill, decode, RSS.

Each figure is a median of several runs; transformers (torch, CPU, float32) runs on the same
weights in the same process so the ratio is taken under the same machine conditions.
Run: python -m bench.e2e [--model M] [--runs 5]. Writes bench/results/e2e_f32.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bandwidth import read_bandwidth_gbps

RESULTS = Path(__file__).parent / "results"
PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_WORDS * (n // 4 + 8))
    return ids[:n]


def lamina_figures(model: str | None, runs: int, prompt_len: int, gen: int) -> dict:
    from engine import LLM, SamplingParams

    load = []
    for _ in range(3):
        t = time.perf_counter()
        llm = LLM(model)
        load.append(time.perf_counter() - t)
    ids = prompt_ids(llm.tokenizer, prompt_len)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.generate(llm.tokenizer.decode(ids[:8]), SamplingParams(max_tokens=2))  # warm-up
    prefill, decode, ttft, tpot = [], [], [], []
    for _ in range(runs):
        stream = llm.stream(ids, params)
        for _ in stream:
            pass
        m = stream.output.metrics
        ttft.append(m.ttft_s)
        tpot.append(m.tpot_s)
        prefill.append(m.prefill_tokens_per_s)
        decode.append(m.tokens_per_s)
    weights_mb = llm.loaded.weights.nbytes / 2**20
    return {
        "load_s": statistics.median(load),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(ttft),
        "tpot_s": statistics.median(tpot),
        "weights_mb": weights_mb,
        "bytes_per_token": llm.loaded.weights.nbytes,
    }


def transformers_figures(model_path: Path, runs: int, prompt_len: int, gen: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    kw = {"gguf_file": model_path.name} if model_path.is_file() else {}
    folder = model_path.parent if model_path.is_file() else model_path
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    ids = torch.tensor([prompt_ids(tok, prompt_len)])
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(runs):
            t = time.perf_counter()
            out = hf(ids, use_cache=True)
            prefill.append(prompt_len / (time.perf_counter() - t))
            token = out.logits[:, -1:].argmax(-1)
            past = out.past_key_values
            t = time.perf_counter()
            for _ in range(gen):
                out = hf(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(gen / (time.perf_counter() - t))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


_STARTUP = """
import time, json, resource
t0 = time.perf_counter()
from engine import LLM, SamplingParams
llm = LLM({model!r})
out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0]
print(json.dumps({{"load_s": llm.loaded.load_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def startup_figures(model: str | None) -> dict:
    """Process start through model load and a 4-token generation, with an empty numba cache
    (cold: includes compiling every kernel) and then with the filled cache (warm)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _STARTUP.format(model=model)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - t
            runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall})
    cold, warm = runs
    return {
        "cold_start_s": cold["wall_s"],
        "warm_start_s": warm["wall_s"],
        "compile_s": cold["wall_s"] - warm["wall_s"],
        "peak_rss_mb": warm["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    from engine.loader.default_model import default_model_path

    result = {"model": args.model or str(default_model_path()), "precision": "f32"}
    result.update(startup_figures(args.model))
    result["bandwidth_gbps"] = read_bandwidth_gbps()
    result.update(lamina_figures(args.model, args.runs, args.prompt_tokens, args.gen_tokens))
    limit = result["bandwidth_gbps"] * 1e9 / result["bytes_per_token"]
    result["decode_vs_bandwidth_limit"] = result["decode_tok_s"] / limit
    if not args.no_peers:
        path = Path(args.model) if args.model else default_model_path()
        peer = transformers_figures(
            path, max(3, args.runs // 2), args.prompt_tokens, args.gen_tokens
        )
        result["peers"] = {"transformers": peer}
        result["decode_vs_transformers"] = result["decode_tok_s"] / peer["decode_tok_s"]
        result["prefill_vs_transformers"] = result["prefill_tok_s"] / peer["prefill_tok_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "e2e_f32.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
