"""llama.cpp's own tools as the peer: `llama-bench`, `llama-quantize`, `llama-server` and
`llama-perplexity`.

llama-cpp-python's Python generate loop adds its own per-token overhead, so it understates
llama.cpp. The fair peer is llama.cpp's C++ tools, built once on this machine with
GGML_NATIVE=ON (every ISA extension the CPU has) from the sources vendored in the
llama-cpp-python sdist, with cmake and ninja from PyPI, and cached under the lamina cache
folder per llama-cpp-python version and CPU kind. Nothing here runs in CI: tests parse a
recorded `llama-bench -o json` output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from kernels_cpu.jit_cache import cache_dir

TOOLS = ("llama-bench", "llama-quantize", "llama-server", "llama-perplexity")
# Keep the build small: no network, no tests or examples. The tools link llama.cpp's shared
# libraries, copied next to them and found through LD_LIBRARY_PATH.
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
)


def _sdist_version() -> str | None:
    """The installed llama-cpp-python's version, so the tools match the server peer."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def tools_dir() -> Path:
    from kernels_cpu.simd import host_kind

    return cache_dir() / "llama.cpp" / f"{_sdist_version() or 'latest'}-{host_kind()}"


def tools_built() -> bool:
    return all((tools_dir() / tool).exists() for tool in TOOLS)


def build_tools(log=sys.stderr) -> Path:
    """The folder holding the built tools, building them first if they are not cached."""
    out = tools_dir()
    if tools_built():
        return out
    import cmake  # the PyPI packages: no system toolchain beyond a C++ compiler
    import ninja

    cmake_bin = Path(cmake.CMAKE_BIN_DIR) / "cmake"
    ninja_bin = Path(ninja.BIN_DIR) / "ninja"
    version = _sdist_version()
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"lamina bench: building llama.cpp's tools from {spec} (once)", file=log)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
              "--no-deps", spec, "-d", str(work)])  # fmt: skip
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (source,) = work.glob("llama_cpp_python-*/vendor/llama.cpp")
        build = work / "build"
        _run([str(cmake_bin), "-S", str(source), "-B", str(build), "-G", "Ninja",
              f"-DCMAKE_MAKE_PROGRAM={ninja_bin}", *_CMAKE_FLAGS])  # fmt: skip
        _run([str(ninja_bin), "-C", str(build), *TOOLS])
        shutil.rmtree(out, ignore_errors=True)  # a cache from a build with fewer tools
        shutil.copytree(build / "bin", out, symlinks=True)
    return out


def quantize(tools: Path, source: Path, qtype: str, target: Path) -> Path:
    """`llama-quantize SOURCE TARGET QTYPE`, once: the peer runs its own quantization."""
    if not target.exists():
        partial = target.with_suffix(".partial")
        requant = ["--allow-requantize"]  # a GGUF shipped quantized (the default model)
        cmd = [str(tools / "llama-quantize"), *requant, str(source), str(partial), qtype]
        _run(cmd, _env(tools))
        partial.rename(target)
    return target


def llama_bench(tools: Path, gguf: Path, threads: int, prompt: int, gen: int, reps: int) -> dict:
    """One `llama-bench -o json` run with `threads` threads: pp`prompt` from an empty context,
    and tg`gen` after `prompt` tokens of context (-d), as lamina decodes after its prompt
    (llama-bench's tg alone starts from an empty context, where attention costs nothing)."""
    depths = "0" if prompt == 0 else f"0,{prompt}"
    cmd = [str(tools / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-d", depths, "-r", str(reps), "-o", "json"]  # fmt: skip
    return parse_llama_bench(_run(cmd, _env(tools)), depth=prompt)


def llama_perplexity(tools: Path, gguf: Path, text: Path, context: int, chunks: int) -> float:
    """`llama-perplexity`'s final estimate on `text`: `chunks` chunks of `context` tokens."""
    import numba

    cmd = [str(tools / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(context),
           "--chunks", str(chunks), "-t", str(numba.config.NUMBA_NUM_THREADS)]  # fmt: skip
    return parse_perplexity(_run_all(cmd, _env(tools)))


def parse_perplexity(log: str) -> float:
    """The PPL of llama-perplexity's `Final estimate: PPL = 11.6700 +/- 0.43480` line."""
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if match is None:
        raise RuntimeError(f"llama-perplexity printed no final estimate:\n{log[-2000:]}")
    return float(match.group(1))


def server_command(
    tools: Path, gguf: Path, alias: str, slots: int, context_per_slot: int
) -> tuple[list[str], dict[str, str]]:
    """`llama-server` serving `slots` requests at once (-np), with every core's thread, and
    the environment that finds its libraries; the caller adds --port."""
    import numba

    cmd = [str(tools / "llama-server"), "-m", str(gguf), "--alias", alias, "--host", "127.0.0.1",
           "-np", str(slots), "-c", str(slots * context_per_slot),
           "-t", str(numba.config.NUMBA_NUM_THREADS)]  # fmt: skip
    return cmd, _env(tools)


def parse_llama_bench(text: str, depth: int = 0) -> dict:
    """Prefill (pp, from an empty context) and decode (tg, after `depth` tokens of context)
    figures from llama-bench's JSON output."""
    rows = json.loads(text)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and not r.get("n_depth"))
    tg = next(
        r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0 and r.get("n_depth", 0) == depth
    )
    return {
        "prefill_tok_s": pp["avg_ts"],
        "decode_tok_s": tg["avg_ts"],
        "prefill_samples_tok_s": pp["samples_ts"],
        "decode_samples_tok_s": tg["samples_ts"],
        "weights": tg["model_type"],
        "threads": tg["n_threads"],
        "decode_depth": tg.get("n_depth", 0),
        "cpu": tg["cpu_info"],
        "build": f"{tg['build_commit']} ({tg['build_number']})",
    }


def _env(tools: Path) -> dict[str, str]:
    """The tools' environment: their shared libraries beside them, a plain locale."""
    return {**os.environ, "LC_ALL": "C", "LD_LIBRARY_PATH": str(tools)}


def _run_all(cmd: list[str], env: dict[str, str]) -> str:
    """Run a tool that reports on stderr; both streams."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command; its output on failure, so a broken build says why."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:2])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    return proc.stdout
