"""`lamina bench`: end-to-end speed of lamina and its peers, measured side by side in one run.

Every figure is a median of several runs; ratios are taken between figures of the same run,
because this machine is shared and noisy. Results go to stdout (one JSON object with --json)
and to bench/results/ as JSON, a markdown table and a PNG chart.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bandwidth import bandwidth_figures
from bench.llama_cpp import build_tools, llama_bench
from bench.peers import gguf_of_type, installed, llama_cpp_gguf, transformers_figures
from bench.random_model import random_model_path
from bench.report import write_report
from bench.timing import KernelTimer
from engine.errors import InvalidInputError
from engine.loader.checkpoint import weights_format
from kernels_cpu.jit_cache import cache_dir

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def resolve_model(model: str | None) -> Path:
    if model and model.startswith("random:"):
        return random_model_path(model)
    from engine.loader.default_model import default_model_path

    return Path(model) if model else default_model_path()


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT * (n // 8 + 8))
    return ids[:n]


def lamina_figures(
    path: Path,
    quant: str | None,
    prompt: int,
    gen: int,
    runs: int,
    between: Callable[[], None] | None = None,
    speculative: dict | None = None,
) -> tuple[dict, list[int]]:
    """lamina's figures, and the prompt ids it used (the peers get the same ones).
    `between` runs after each of lamina's runs: a peer's run, interleaved with lamina's so
    that both see the same machine load. `speculative`: decode speculating so."""
    from engine import LLM, SamplingParams

    # Every run prefills in full.
    llm = LLM(path, quant=quant, enable_prefix_caching=False, speculative=speculative)
    ids = prompt_ids(llm.tokenizer, prompt)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.generate(llm.tokenizer.decode(ids[:16]), SamplingParams(max_tokens=2))  # warm-up
    timer = KernelTimer(llm.backend)
    ttft, tpot, outside, expert_bytes, accepted = [], [], [], [], []
    for _ in range(runs):
        stream = llm.stream(ids, params)
        next(stream)
        timer.reset()  # count decode steps only
        experts_before = llm.backend.expert_bytes_read
        for _ in stream:
            pass
        m = stream.output.metrics
        accepted.append(m.acceptance_rate)
        ttft.append(m.ttft_s)
        tpot.append(m.tpot_s)
        decode_s = m.total_s - m.ttft_s
        outside.append((decode_s - timer.seconds) / (m.generated_tokens - 1))
        read = llm.backend.expert_bytes_read - experts_before
        expert_bytes.append(read / (m.generated_tokens - 1))
        if between is not None:
            between()
    t, p = statistics.median(ttft), statistics.median(tpot)
    weights, config = llm.loaded.weights, llm.loaded.config
    all_experts = sum(
        layer.experts.nbytes - layer.experts.router.nbytes
        for layer in weights.layers
        if layer.experts is not None
    )
    moe = {}
    if all_experts:  # a mixture of experts reads its shared weights and the experts it runs
        active = weights.nbytes - all_experts + _active_expert_bytes(weights, config)
        moe = {
            "active_param_bytes": active,
            "bytes_per_token_vs_active": (weights.nbytes - all_experts + statistics.median(
                expert_bytes)) / active,
        }  # fmt: skip
    return {
        "weights": weights_format(llm.loaded.weights),
        "load_s": llm.loaded.load_s,
        "ttft_s": t,
        "tpot_s": p,
        "prefill_tok_s": prompt / t,
        "decode_tok_s": 1.0 / p,
        "overhead_per_token_s": statistics.median(outside),
        "kernel_calls_per_token": timer.calls / max(1, gen - 1),
        "bytes_per_token": weights.nbytes - all_experts + statistics.median(expert_bytes),
        **moe,
        **({} if speculative is None else {
            "speculative": speculative, "acceptance_rate": statistics.median(accepted)})
    }, ids  # fmt: skip


def _active_expert_bytes(weights, config) -> float:
    """What a token's experts weigh: per MoE layer, top k experts of the layer's mean size."""
    total = 0.0
    for layer in weights.layers:
        if layer.experts is not None:
            e = layer.experts
            total += config.experts_per_token * (e.nbytes - e.router.nbytes) / e.count
    return total


_STARTUP = """
import json, resource, sys, time
t0 = time.perf_counter()
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], quant=sys.argv[2] or None)
out = llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0))[0]
print(json.dumps({"first_token_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _first_token_run(path: Path, quant: str | None, env: dict) -> dict:
    """A fresh process from start to its first token: wall seconds and peak RSS."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _STARTUP, str(path), quant or ""],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": time.perf_counter() - t}


def startup_figures(path: Path, quant: str | None) -> dict:
    """Fresh process to first token, with an empty numba cache (cold) and then a filled one;
    for int8, also from the lamina checkpoint `lamina quantize` writes (what a user who
    converted once starts from), with the cache filled."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(scratch) / "numba")}
        cold, warm = (_first_token_run(path, quant, env) for _ in range(2))
        figures = {
            "cold_start_s": cold["wall_s"],
            "warm_start_s": warm["wall_s"],
            "compile_s": cold["wall_s"] - warm["wall_s"],
            "peak_rss_mb": warm["peak_rss_mb"],
        }
        if quant == "int8":
            checkpoint = Path(scratch) / "checkpoint"
            quantize = f"from engine.cli import main; raise SystemExit(main(['quantize', {str(path)!r}, {str(checkpoint)!r}]))"
            subprocess.run(
                [sys.executable, "-c", quantize], env=env, capture_output=True, check=True
            )
            _first_token_run(checkpoint, None, env)  # compiles what loading it needs
            figures["warm_start_checkpoint_s"] = _first_token_run(checkpoint, None, env)["wall_s"]
        if quant is None and path.is_file():
            figures.update(gguf_load_figures(path, Path(scratch) / "repacked"))
    return figures


def gguf_load_figures(path: Path, cache: Path) -> dict:
    """Loading a GGUF in its own quantization, in fresh processes with the page cache warm:
    the first time (repacking, and writing the repacked layout to an empty cache at `cache`)
    and the next (mapping it): seconds, and the peak RSS growth as a share of the file."""
    from bench.load_memory import measure_load

    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    size = path.stat().st_size
    figures = {"gguf_bytes": size}
    for label in ("first", "cached"):
        result = measure_load(path, env)
        figures[f"gguf_load_{label}_s"] = result["load_s"]
        growth = result["peak_growth"]
        figures[f"gguf_load_{label}_peak_rss_vs_file"] = None if growth is None else growth / size
    return figures


def run_e2e(
    model: str | None,
    quant: str | None,
    prompt: int,
    gen: int,
    runs: int,
    peers: list[str],
    gguf_type: str | None = None,
    speculative: dict | None = None,
) -> dict:
    """Decode and prefill speed, start-up, bandwidth ratio and the peers on the same weights.
    `gguf_type`: both engines run the model as llama-quantize makes it in that type (lamina
    in the file's own quantization)."""
    path = resolve_model(model)
    if gguf_type:
        path = gguf_of_type(path, gguf_type, _gguf_cache(path))
    result: dict = {"model": model or "default", "path": str(path), "quant": quant}
    result["prompt_tokens"], result["gen_tokens"], result["runs"] = prompt, gen, runs
    result.update(startup_figures(path, quant))
    result.update(bandwidth_figures())
    peer_runs: list[dict] = []
    between = None
    if "llama.cpp" in peers and installed("llama.cpp"):
        between = _llama_bench_round(path, quant, prompt, gen, peer_runs)
    figures, ids = lamina_figures(path, quant, prompt, gen, runs, between, speculative)
    result.update(figures)
    result["quant"] = figures["weights"]
    result["bandwidth_limit_tok_s"] = result["bandwidth_gbps"] * 1e9 / result["bytes_per_token"]
    result["decode_vs_bandwidth_limit"] = result["decode_tok_s"] / result["bandwidth_limit_tok_s"]
    result["peers"], result["peers_skipped"] = {}, []
    for peer in peers:
        if not installed(peer):
            result["peers_skipped"].append(f"{peer} (not installed)")
            continue
        if peer == "llama.cpp":
            figures = _median_llama_bench(peer_runs)
        else:
            figures = transformers_figures(path, ids, gen, max(2, runs // 2))
        result["peers"][peer] = figures
        for key in ("decode_tok_s", "prefill_tok_s"):
            result[f"{key}_vs_{peer}"] = result[key] / figures[key]
    return result


def run_profile(
    model: str | None, quant: str | None, prompt: int, gen: int, sequences: int = 1
) -> dict:
    """Where the time of a decode step goes, with `sequences` sequences decoding together:
    each backend op (linears per shape and format) in microseconds per step, its calls per
    step and its share of the step, and what is left outside the kernels (Python,
    scheduling, sampling). A step gives each sequence one token."""
    from engine import LLM, SamplingParams

    path = resolve_model(model)
    llm = LLM(path, quant=quant, enable_prefix_caching=False, max_num_seqs=max(sequences, 1))
    ids = prompt_ids(llm.tokenizer, prompt)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.generate([ids] * sequences, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    engine = llm._engine
    requests = [llm.new_request(ids, params) for _ in range(sequences)]
    for output, request_params in requests:
        engine.submit(output, request_params)
    while any(not output.outputs[0].token_ids for output, _ in requests):
        engine.step()  # the prompts (in chunks if they are long)
    timer = KernelTimer(llm.backend, per_op=True)  # decode steps only
    steps, start = 0, time.perf_counter()
    while not all(output.finished for output, _ in requests):
        engine.step()
        steps += 1
    decode_s = time.perf_counter() - start
    ops = [
        {
            "op": op,
            "us_per_step": 1e6 * seconds / steps,
            "calls_per_step": calls / steps,
            "share": seconds / decode_s,
        }
        for op, (seconds, calls) in sorted(timer.per_op.items(), key=lambda kv: -kv[1][0])
    ]
    outside = decode_s - timer.seconds
    ops.append(
        {"op": "outside kernels", "us_per_step": 1e6 * outside / steps, "share": outside / decode_s}
    )
    return {
        "kind": "profile",
        "model": model or "default",
        "quant": quant or "f32",
        "prompt_tokens": prompt,
        "gen_tokens": gen,
        "sequences": sequences,
        "step_us": 1e6 * decode_s / steps,
        "decode_tok_s": sequences * steps / decode_s,
        "ops": ops,
    }


_BUSY = "while True: pass"


def run_contention(model: str | None, quant: str | None, prompt: int, gen: int, runs: int) -> dict:
    """Decode speed with the default thread policy and with each fixed thread count, with the
    machine idle and with one busy process per core (what a laptop running other programs
    looks like), and the default's speed as a share of the best fixed count's under each load.
    Settings take turns run by run, so all see the same load."""
    import numba

    from engine import LLM, SamplingParams
    from engine.thread_policy import ThreadPolicy

    llm = LLM(resolve_model(model), quant=quant, enable_prefix_caching=False)
    runner = llm._engine.runner
    ids = prompt_ids(llm.tokenizer, prompt)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.generate(ids, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    cores = numba.config.NUMBA_NUM_THREADS
    settings: list[int | None] = [None, *range(1, cores + 1)]  # None: the default policy
    rows, summary = [], {}
    for busy in (0, cores):
        hogs = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(busy)]
        try:
            tpots: dict[int | None, list[float]] = {s: [] for s in settings}
            policies = {s: ThreadPolicy(s) for s in settings}  # the default's learns as it runs
            for _ in range(runs):
                for setting in settings:
                    runner.threads = policies[setting]
                    tpots[setting].append(llm.generate(ids, params)[0].metrics.tpot_s)
        finally:
            runner.threads = ThreadPolicy()
            for hog in hogs:
                hog.kill()
                hog.wait()
        speeds = {s: 1 / statistics.median(t) for s, t in tpots.items()}
        for setting, speed in speeds.items():
            threads = "default" if setting is None else setting
            rows.append({"busy_processes": busy, "threads": threads, "decode_tok_s": speed})
        best = max(range(1, cores + 1), key=speeds.get)
        summary[f"busy_{busy}"] = {
            "best_threads": best,
            "default_vs_best": speeds[None] / speeds[best],
        }
    return {"kind": "contention", "model": model or "default", "quant": quant or "f32",
            "runs": runs, "rows": rows, "summary": summary}  # fmt: skip


def _profile_table(result: dict) -> str:
    head = f"decode step of {result['sequences']} sequence(s): {result['step_us']:.0f} us"
    lines = [f"{head} ({result['decode_tok_s']:.1f} tok/s)"]
    for row in result["ops"]:
        calls = f"{row['calls_per_step']:6.1f}" if "calls_per_step" in row else "      "
        lines.append(
            f"{row['op']:>40}  {row['us_per_step']:9.1f} us  {calls} calls  {row['share']:6.1%}"
        )
    return "\n".join(lines)


def _llama_bench_round(
    path: Path, quant: str | None, prompt: int, gen: int, runs: list[dict]
) -> Callable[[], None]:
    """One llama-bench repetition (pp`prompt`, tg`gen`, lamina's thread count) per call,
    on the same weights quantized by llama-quantize; appended to `runs`."""
    import numba

    gguf = llama_cpp_gguf(path, quant, _gguf_cache(path))
    tools, threads = build_tools(), numba.config.NUMBA_NUM_THREADS
    return lambda: runs.append(llama_bench(tools, gguf, threads, prompt, gen, reps=1))


def _gguf_cache(path: Path) -> Path:
    """Where the GGUFs made from model `path` for the peers are kept."""
    cache = cache_dir() / f"gguf-{path.stem if path.is_file() else path.name}"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _median_llama_bench(runs: list[dict]) -> dict:
    """llama-bench's figures as medians over the interleaved runs (and its own samples)."""
    decode = [t for r in runs for t in r["decode_samples_tok_s"]]
    prefill = [t for r in runs for t in r["prefill_samples_tok_s"]]
    keep = ("weights", "threads", "cpu", "build")
    return {
        **{k: runs[0][k] for k in keep},
        "decode_tok_s": statistics.median(decode),
        "prefill_tok_s": statistics.median(prefill),
        "runs": len(runs),
    }


def main(args) -> int:
    """Entry point for `lamina bench` (args parsed by engine.cli)."""
    if args.what == "kernels":
        from bench.kernels import run_kernels

        rows = run_kernels(args.runs)
        write_report("kernels", rows)
        for row in rows:
            print(json.dumps(row) if args.json else _kernel_line(row))
        return 0
    if args.what == "perplexity":
        from bench.perplexity_peer import perplexity_table

        rows = perplexity_table()
        write_report("perplexity", rows)
        for row in rows:
            print(json.dumps(row))
        return 0
    if args.what == "sparsity":
        from bench.sparsity import (
            quality_table,
            quality_table_int4,
            speed_table,
            speed_table_int4,
        )

        rows = quality_table(args.runs)
        write_report("sparsity-quality", rows)
        speed = speed_table(args.runs)
        write_report("sparsity-speed", [speed])
        rows_int4 = quality_table_int4(args.runs)
        write_report("sparsity-int4-quality", rows_int4)
        speed_int4 = speed_table_int4(args.runs)
        write_report("sparsity-int4-speed", [speed_int4])
        for row in [*rows, speed, *rows_int4, speed_int4]:
            print(json.dumps(row) if args.json else json.dumps(row, indent=2))
        return 0
    if args.what == "speculative":
        from bench.speculative import run_speculative, write_speculative

        rows = run_speculative(args.model, args.quant, args.runs)
        write_speculative(rows)
        for row in rows:
            print(json.dumps(row) if args.json else json.dumps(row, indent=2))
        return 0
    if args.what == "structured":
        from bench.structured import run_structured, write_structured

        rows = run_structured(args.model, args.quant, args.gen_tokens, args.runs)
        write_structured(rows)
        for row in rows:
            print(json.dumps(row) if args.json else json.dumps(row, indent=2))
        return 0
    if args.cpu_memory is not None:
        from bench.streaming import run_streaming_bench

        result = run_streaming_bench(
            resolve_model(args.model),
            args.quant,
            args.cpu_memory,
            args.prompt_tokens,
            args.gen_tokens,
            args.runs,
        )
        write_report(f"stream-{_slug(args.model)}-{result['quant']}", [result])
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    if args.contention:
        result = run_contention(
            args.model, args.quant, args.prompt_tokens, args.gen_tokens, args.runs
        )
        write_report(f"contention-{_slug(args.model)}-{result['quant']}", [result])
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    if args.profile:
        result = run_profile(
            args.model, args.quant, args.prompt_tokens, args.gen_tokens, args.sequences
        )
        name = f"profile-{_slug(args.model)}-{result['quant']}"
        write_report(name + (f"-seq{args.sequences}" if args.sequences > 1 else ""), [result])
        print(json.dumps(result) if args.json else _profile_table(result))
        return 0
    peers = [p for p in (args.peers or "").split(",") if p]
    if args.what == "serve":
        from bench.server import run_serve_bench

        result = run_serve_bench(
            resolve_model(args.model),
            args.quant,
            args.runs,
            peers,
            args.clients,
            args.gen_tokens,
            args.kv_cache_dtype,
        )
        kv = "" if args.kv_cache_dtype == "float32" else f"-kv{args.kv_cache_dtype}"
        write_report(f"serve-{_slug(args.model)}-{result['quant']}{kv}", [result])
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    if args.ray and not args.batch:
        raise InvalidInputError("bench --ray measures the batch job: give --batch too")
    if args.batch and args.ray:
        from bench.ray_batch import run_ray_batch_bench

        result = run_ray_batch_bench(args.quant, args.runs)
        write_report("batch-ray", [result])
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    if args.batch:
        from bench.batch import run_batch_bench

        result = run_batch_bench(
            resolve_model(args.model), args.quant, args.runs, peers, args.kv_cache_dtype
        )
        kv = "" if args.kv_cache_dtype == "float32" else f"-kv{args.kv_cache_dtype}"
        write_report(f"batch-{_slug(args.model)}-{result['quant']}{kv}", [result])
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    from engine.engine_config import speculative_from_cli

    result = run_e2e(
        args.model, args.quant, args.prompt_tokens, args.gen_tokens, args.runs, peers,
        args.gguf_type, speculative_from_cli(args),
    )  # fmt: skip
    spec = f"-spec-{args.speculative_method}" if args.speculative_method else ""
    write_report(f"e2e-{_slug(args.model)}-{result['quant']}{spec}", [result])
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _slug(model: str | None) -> str:
    return (model or "default").replace(":", "-").replace("/", "_")


def _kernel_line(row: dict) -> str:
    return (
        f"{row['kernel']:>10} {row['shape']:>12}  {row['gbps']:6.1f} GB/s  "
        f"({row['vs_bandwidth']:.2f} of {row['bandwidth_gbps']:.1f} GB/s)"
    )
