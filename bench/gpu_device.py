"""The CUDA backend's figures on a real GPU, in one script (issue 21's device run).

    python -m bench.gpu_device OUT_DIR [--models llama-1b,llama-7b] [--skip-tests]
                                       [--tokenizer DIR]

The device machine has numba, numba-cuda, numpy, torch, transformers, tokenizers,
safetensors, jinja2 and pyyaml but no package registry and not the 94 MB default model, so
prepare here, into ignored folders that the run carries:

    pip download --no-deps -d device/wheels gguf psutil
    python -c "from engine.loader.model_loader import load_model; \
               load_model(None).tokenizer.save('device/tokenizer')"

and run there, from the working tree:

    pip install --no-index --no-deps device/wheels/* && \
    python -m bench.gpu_device $OUT --tokenizer device/tokenizer

Writes OUT_DIR/gpu.jsonl, a JSON line per figure as soon as it is measured (a run cut off
keeps what it had), in this order:
- `tests`: the CUDA tests without the simulator (pass / fail counts and the failures' names);
- `bandwidth`: a device-to-device copy and a pinned host-to-device copy (GB/s), the probes
  the other figures are ratios of;
- `gemv`: the int8 and the int4 (group 32, float16 scales) decode GEMV, one token, on
  4096 x 11008 and 11008 x 4096, its bytes per second against the device-to-device copy;
- `decode` per model and weights (random weights of a real shape, int8 then int4,
  resident): prefill and decode tok/s of lamina, and of transformers on torch CUDA in bf16
  on the same weights, same run (measured once per model, with int8);
- `streaming`: the 1.1B model under a GPU budget of 40% of its int8 weights: tok/s, the
  host-to-device GB/s of its layer copies against the pinned probe, and the share of the
  copying hidden behind compute.
Each section catches its own failure (recorded as `error`), so one bad figure loses only
itself.

Under numba's CUDA simulator the same code runs on toy shapes (`tests/test_bench.py`), which
checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

CUDA_TESTS = ("tests/test_kernels_gpu.py", "tests/test_kernels_gpu_blocks.py",
              "tests/test_cuda_backend.py", "tests/test_device_streaming.py",
              "tests/test_expert_cache.py")  # fmt: skip
WEIGHTS = ("int8", "int4")
GEMV_SHAPES = ((11008, 4096), (4096, 11008))
PROMPT, GEN, RUNS = 128, 64, 3
STREAM_KV_MB = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_device")
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default="llama-1b,llama-7b", help="random:NAME shapes")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--gemv", default=",".join(f"{n}x{k}" for n, k in GEMV_SHAPES))
    parser.add_argument("--probe-mb", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=PROMPT)
    parser.add_argument("--gen", type=int, default=GEN)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer files for the random models")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "gpu.jsonl"
    sections: list[tuple[str, Callable[[], dict]]] = []
    if not args.skip_tests:
        sections.append(("tests", run_cuda_tests))
    probe: dict = {}  # the copy probes, measured once: the later ratios' denominators

    def measure_probe() -> dict:
        probe.update(bandwidth(args.probe_mb))
        return probe

    sections.append(("bandwidth", measure_probe))
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.gemv.split(",") if s]
    sections += [
        ("gemv", lambda s=s, q=q: gemv_share(*s, q, probe.get("d2d_gbps")))
        for q in WEIGHTS
        for s in shapes
    ]
    peers: dict[str, dict] = {}  # transformers per model, measured with the first weights
    for name in [m for m in args.models.split(",") if m]:
        for quant in WEIGHTS:
            run = (name, quant, args.tokenizer, args.prompt, args.gen, peers)
            sections.append(("decode", lambda run=run: decode(*run)))
    first = next((m for m in args.models.split(",") if m), None)
    if first is not None:
        sections.append(
            (
                "streaming",
                lambda: streaming(
                    first, args.tokenizer, args.prompt, args.gen, probe.get("h2d_pinned_gbps")
                ),
            )
        )
    for kind, measure in sections:
        started = time.perf_counter()
        try:
            row = {"kind": kind, **measure()}
        except Exception as error:  # noqa: BLE001 - one failed figure must not lose the rest
            row = {"kind": kind, "error": repr(error), "traceback": traceback.format_exc()}
        row["seconds"] = round(time.perf_counter() - started, 2)
        row["device"] = device_name()
        with sink.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return 0


def device_name() -> str:
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        return "numba CUDA simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def run_cuda_tests() -> dict:
    """The CUDA tests on the real device (NUMBA_ENABLE_CUDASIM=0)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, check=False)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    failures = re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
    return {"returncode": done.returncode, **counts, "failures": failures, "summary": tail}


def _timed(run: Callable[[], None], repeats: int) -> float:
    """Median seconds of `run` on the device, by CUDA events around each call (host timers
    under the simulator, whose events do not time)."""
    from numba import cuda

    import kernels_gpu

    run()  # warm-up (compilation)
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        if kernels_gpu.simulated():
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            continue
        start, end = cuda.event(timing=True), cuda.event(timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bandwidth(probe_mb: int) -> dict:
    """Device-to-device copy (read + write) and pinned host-to-device copy, GB/s."""
    from numba import cuda

    n = probe_mb * 2**20
    src, dst = cuda.device_array(n, np.uint8), cuda.device_array(n, np.uint8)
    d2d = _timed(lambda: dst.copy_to_device(src), 10)
    pinned = cuda.pinned_array(n, np.uint8)
    pinned[:] = 1
    h2d = _timed(lambda: dst.copy_to_device(pinned), 5)
    return {"probe_mb": probe_mb, "d2d_gbps": 2 * n / d2d / 1e9, "h2d_pinned_gbps": n / h2d / 1e9}


def gemv_share(n: int, k: int, quant: str, d2d_gbps: float | None) -> dict:
    """The decode GEMV (one token, its activation quantisation launch included) on an (n, k)
    weight, int8 (exact int16 x int8 sums) or int4 (lamina's group-32 blocks with float16
    scales, int8 activations per 32 inputs): its weight bytes per second against the
    device-to-device copy's."""
    from numba import cuda

    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((1, k)).astype(np.float32))
    out = cuda.device_array((1, n), np.float32)
    if quant == "int8":
        from kernels_gpu.matmul_int8 import gemm_w8

        w = cuda.to_device(rng.integers(-127, 128, (n, k), dtype=np.int8))
        scale = cuda.to_device(rng.random(n).astype(np.float32))
        act = (cuda.device_array((1, k), np.int16), cuda.device_array(1, np.float32))
        nbytes = w.nbytes + scale.nbytes
        seconds = _timed(lambda: gemm_w8(x, w, scale, 32767, out, 0, act), 20)
    else:
        from engine.weights import BlockWeight
        from kernels_gpu.matmul_blocks import activation_shapes, gemm_blocks

        q = rng.integers(0, 16, (n, k), dtype=np.uint8)
        scales = (rng.random((n, k // 32)) * 0.01).astype(np.float16).view(np.uint16)
        host = BlockWeight.from_rows(q, 4, scales, k, "int4-g32", zero=8)
        blocks = tuple(
            cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in host.kernel_arrays
        )
        act = tuple(cuda.device_array(sh, dt) for sh, dt in activation_shapes(1, k))
        nbytes = host.nbytes
        seconds = _timed(lambda: gemm_blocks(x, blocks, k, n, out, 0, act), 20)
    gbps = nbytes / seconds / 1e9
    share = gbps / d2d_gbps if d2d_gbps else None
    return {"weights": quant, "shape": [n, k], "us": seconds * 1e6, "gbps": gbps,
            "share_of_d2d": share}  # fmt: skip


def _model(name: str, tokenizer: Path | None) -> Path:
    """A model folder given as a path, or the random model of shape `name`."""
    from bench.random_model import random_model_path

    return Path(name) if Path(name).exists() else random_model_path(f"random:{name}", tokenizer)


def decode(
    name: str, quant: str, tokenizer: Path | None, prompt: int, gen: int, peers: dict
) -> dict:
    """Resident lamina in `quant` weights against transformers bf16 on torch CUDA, same
    weights and run (the peer measured once per model, into `peers`)."""
    from engine import LLM, SamplingParams

    path = _model(name, tokenizer)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    with LLM(path, device="cuda", quant=quant, max_model_len=prompt + gen + 16) as llm:
        ids = _prompt(llm, prompt)
        llm.generate([ids], params)  # warm-up
        outs = [llm.generate([ids], params)[0].metrics for _ in range(RUNS)]
    row = {
        "model": name, "weights": quant, "prompt": prompt, "gen": gen,
        "prefill_tok_s": statistics.median(prompt / m.ttft_s for m in outs),
        "decode_tok_s": statistics.median(m.tokens_per_s for m in outs),
    }  # fmt: skip
    if name not in peers:
        peers[name] = _transformers(path, ids, gen)
    peer = peers[name]
    row["transformers_bf16"] = peer
    row["decode_vs_transformers"] = row["decode_tok_s"] / peer["decode_tok_s"]
    return row


def _prompt(llm, tokens: int) -> list[int]:
    """`tokens` ids inside the model's vocabulary (random weights: any ids do)."""
    return [(1000 + i) % llm.config.vocab_size for i in range(tokens)]


def _transformers(path: Path, ids: list[int], gen: int) -> dict:
    """transformers on torch CUDA in bfloat16, greedy with its KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    prompt = torch.tensor([ids], device=device)
    prefill, decode_ = [], []
    with torch.no_grad():
        for run in range(RUNS + 1):
            _sync(torch, device)
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(torch, device)
            first = time.perf_counter() - t0
            for _ in range(gen - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            _sync(torch, device)
            if run:  # the first is a warm-up
                prefill.append(len(ids) / first)
                decode_.append((gen - 1) / (time.perf_counter() - t0 - first))
    del model
    return {"device": device, "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode_)}  # fmt: skip


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def streaming(
    name: str, tokenizer: Path | None, prompt: int, gen: int, h2d_probe_gbps: float | None
) -> dict:
    """The model under a GPU budget of 40% of its int8 weights: the rest streams from pinned
    host memory, layer i + 1 copied while layer i computes."""
    from engine import LLM, SamplingParams

    path = _model(name, tokenizer)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    # A fixed KV cache: sized by what is free, it would shrink to let every layer stay.
    fixed = {"device": "cuda", "quant": "int8", "max_model_len": prompt + gen + 16,
             "kv_cache_mb": STREAM_KV_MB}  # fmt: skip
    with LLM(path, **fixed) as full:
        # Room for the first 40% of the layers, two streaming buffers and the rest as before.
        plan, ids = full.placement, _prompt(full, prompt)
        keep = max(1, int(0.4 * len(plan.layer_bytes)))
        budget = plan.gpu.used - sum(plan.layer_bytes[keep:]) + 2 * max(plan.layer_bytes)
    with LLM(path, gpu_memory=budget, **fixed) as llm:
        llm.generate([ids], params)  # warm-up
        metrics = llm.generate([ids], params)[0].metrics
        stats = llm.device_stream_stats
    return {
        "model": name, "gpu_memory": budget, "resident_layers": keep,
        "decode_tok_s": metrics.tokens_per_s,
        "h2d_gbps": stats.h2d_gbps,
        "h2d_vs_pinned_probe": stats.h2d_gbps / h2d_probe_gbps if h2d_probe_gbps else None,
        "overlap": stats.overlap, "copies": stats.copies, "timer": stats.timer,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
