"""`lamina bench --cpu-memory SIZE`: decode with layers streamed from disk against fully resident.

The model is written once as an int8 lamina checkpoint (streaming reads its file). Each
configuration runs in a fresh process, so that its peak resident memory is its own: fully
resident, streamed with the page cache dropped after every read (the disk's real bandwidth),
and streamed with the page cache kept (what streaming itself costs when the file is cached).
The raw sequential read bandwidth of the same file is measured alongside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RUN = """
import dataclasses, json, statistics, sys
from engine import LLM, SamplingParams
from bench.run import prompt_ids

def status_mb(key):  # VmRSS now, VmHWM its peak: this process's own, unlike ru_maxrss,
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # which keeps the forking parent's peak across exec

path, budget, drop, prompt, gen, runs = sys.argv[1:7]
baseline = status_mb("VmRSS")
llm = LLM(path, cpu_memory=int(budget) if budget else None, drop_page_cache=drop == "1",
          enable_prefix_caching=False)
ids = prompt_ids(llm.tokenizer, int(prompt))
params = SamplingParams(max_tokens=int(gen), temperature=0, ignore_eos=True)
llm.generate(ids[:8], SamplingParams(max_tokens=2))  # warm-up
tpot, decode_s, before = [], 0.0, None
for _ in range(int(runs)):
    stream = llm.stream(ids, params)
    next(stream)  # prefill done: count decode only
    if llm.stream_stats is not None and before is None:
        before = dataclasses.replace(llm.stream_stats)
    for _ in stream:
        pass
    m = stream.output.metrics
    tpot.append(m.tpot_s)
    decode_s += m.total_s - m.ttft_s
result = {
    "decode_tok_s": 1 / statistics.median(tpot),
    "baseline_rss_mb": baseline,
    "peak_rss_mb": status_mb("VmHWM"),
    "placement": llm.placement.describe(),
}
s = llm.stream_stats
if s is not None:
    tokens = int(runs) * (int(gen) - 1)
    read_s, wait_s = s.read_s - before.read_s, s.wait_s - before.wait_s
    result.update({
        "disk_read_gbps": (s.bytes_read - before.bytes_read) / read_s / 1e9,
        "streamed_mb_per_token": (s.bytes_read - before.bytes_read) / tokens / 2**20,
        "overlap": 1 - wait_s / read_s,
        "disk_busy_share": read_s / decode_s,
        "read_s_per_token": read_s / tokens,
        "wait_s_per_token": wait_s / tokens,
        "unprefetched_loads": s.sync_reads - before.sync_reads,
        "stats": s.describe(),
    })
llm.close()
print(json.dumps(result))
"""


def run_streaming_bench(
    model_path: Path, quant: str | None, cpu_memory: int, prompt: int, gen: int, runs: int
) -> dict:
    """Figures of streamed against resident decode, for `model_path` under `cpu_memory`."""
    with tempfile.TemporaryDirectory(prefix="lamina-stream-bench-") as tmp:
        checkpoint = _as_checkpoint(model_path, quant, Path(tmp))
        weights = checkpoint / "model.safetensors"
        model_bytes = weights.stat().st_size
        result: dict = {
            "model_path": str(model_path),
            "quant": "int8" if quant is None else quant,
            "prompt_tokens": prompt,
            "gen_tokens": gen,
            "runs": runs,
            "checkpoint_mb": model_bytes / 2**20,
            "cpu_memory_mb": cpu_memory / 2**20,
            "model_vs_budget": model_bytes / cpu_memory,
            "raw_disk_read_gbps": _raw_read_gbps(weights),
        }
        resident = _run(checkpoint, None, False, prompt, gen, runs)
        dropped = _run(checkpoint, cpu_memory, True, prompt, gen, runs)
        cached = _run(checkpoint, cpu_memory, False, prompt, gen, runs)
    result["resident_decode_tok_s"] = resident["decode_tok_s"]
    result["resident_peak_rss_mb"] = resident["peak_rss_mb"]
    result["streamed_decode_tok_s"] = dropped["decode_tok_s"]
    result["streamed_vs_resident"] = dropped["decode_tok_s"] / resident["decode_tok_s"]
    result["page_cache"] = "dropped after each read (posix_fadvise DONTNEED)"
    keys = ("disk_read_gbps", "streamed_mb_per_token", "overlap", "disk_busy_share")
    for key in (*keys, "read_s_per_token", "wait_s_per_token", "unprefetched_loads"):
        result[key] = dropped[key]
    result["disk_bound_tok_s"] = (
        dropped["disk_read_gbps"] * 1e9 / (dropped["streamed_mb_per_token"] * 2**20)
    )
    result["streamed_cached_decode_tok_s"] = cached["decode_tok_s"]
    result["streamed_cached_vs_resident"] = cached["decode_tok_s"] / resident["decode_tok_s"]
    result["cached_read_gbps"] = cached["disk_read_gbps"]
    result["cached_overlap"] = cached["overlap"]
    rss = max(dropped["peak_rss_mb"], cached["peak_rss_mb"])
    result["peak_rss_mb"] = rss
    result["baseline_rss_mb"] = dropped["baseline_rss_mb"]
    result["rss_growth_mb"] = rss - dropped["baseline_rss_mb"]
    result["rss_growth_vs_budget"] = result["rss_growth_mb"] / result["cpu_memory_mb"]
    result["placement"] = dropped["placement"]
    result["stream_stats"] = dropped["stats"]
    return result


def _as_checkpoint(path: Path, quant: str | None, tmp: Path) -> Path:
    """`path` if it is a lamina checkpoint, else a checkpoint of it written under tmp by
    `lamina quantize` (in its own process, so this one stays small) and flushed to disk
    (dirty pages cannot be dropped from the page cache)."""
    config = path / "config.json"
    if config.is_file() and "lamina" in json.loads(config.read_text()):
        return path
    out = tmp / "checkpoint"
    quantize = ["-m", "engine.cli", "quantize", str(path), str(out), "--weights", quant or "int8"]
    _python(quantize, "lamina quantize")
    fd = os.open(out / "model.safetensors", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def _raw_read_gbps(path: Path, chunk: int = 64 * 2**20) -> float:
    """Sequential single-threaded read of the file with the page cache dropped: the disk's
    bandwidth as streaming sees it, for comparison with the streamed figure."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = memoryview(bytearray(chunk))
        offset, start = 0, time.perf_counter()
        while got := os.preadv(fd, [buf], offset):
            os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
            offset += got
        return offset / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)


def _run(
    checkpoint: Path, cpu_memory: int | None, drop: bool, prompt: int, gen: int, runs: int
) -> dict:
    argv = [str(checkpoint), str(cpu_memory or ""), "1" if drop else "0"]
    out = _python(["-c", _RUN, *argv, str(prompt), str(gen), str(runs)], "a streaming bench run")
    return json.loads(out.strip().splitlines()[-1])


def _python(argv: list[str], what: str) -> str:
    """stdout of a fresh Python process running argv; its stderr tail if it fails."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout
