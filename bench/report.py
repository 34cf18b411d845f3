"""Write bench results as JSON, a markdown table and (with matplotlib) a PNG chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def results_dir() -> Path:
    """bench/results/, or $LAMINA_BENCH_RESULTS (read at call time, for tests)."""
    return Path(os.environ.get("LAMINA_BENCH_RESULTS") or Path(__file__).parent / "results")


_TABLE_KEYS = (
    "kernel", "shape", "gbps", "vs_bandwidth",
    "quant", "kv_cache_dtype", "decode_tok_s", "prefill_tok_s", "ttft_s", "tpot_s", "load_s", "warm_start_s",
    "cold_start_s", "peak_rss_mb", "bandwidth_gbps", "decode_vs_bandwidth_limit",
    "overhead_per_token_s", "batch16_vs_single", "prefix_ttft_speedup", "job_gen_tok_s",
    "kv_waste", "vs_dense_int8",
    "kind", "sparsity", "perplexity", "perplexity_vs_dense", "decode_vs_dense", "weights_mb",
    "dense_int8_decode_tok_s", "weight_sparse_50_decode_tok_s", "weight_sparse_50_vs_dense",
    "activation_sparse_40_decode_tok_s", "activation_sparse_40_vs_dense",
    "cpu_memory_mb", "checkpoint_mb", "resident_decode_tok_s", "streamed_decode_tok_s",
    "streamed_vs_resident", "streamed_cached_decode_tok_s", "disk_read_gbps", "raw_disk_read_gbps",
    "overlap", "disk_busy_share", "rss_growth_mb",
    "clients", "single_tok_s", "aggregate_tok_s", "aggregate_vs_single", "ttft_p50_s",
    "ttft_p99_s", "failures",
)  # fmt: skip


def machine() -> dict:
    """What every figure needs next to it: the CPU, the ISA path the kernels chose, the
    threads they ran with, and the lamina commit measured."""
    import platform

    import numba

    from kernels_cpu.simd import host_kind

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    source = Path(__file__).resolve().parents[1]
    git = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    return {
        "cpu": cpu,
        "isa": host_kind(),
        "threads": numba.config.NUMBA_NUM_THREADS,
        "commit": commit,
    }


def write_rows(name: str, rows: list[dict]) -> Path:
    """Stamp each row with `machine()` (so the JSON printed after it carries it too), write
    them to bench/results/NAME.json; -> the results folder."""
    stamp = machine()
    for row in rows:
        row.setdefault("machine", stamp)
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return out


def write_report(name: str, rows: list[dict]) -> None:
    """The rows' JSON (`write_rows`), a markdown table and a chart."""
    out = write_rows(name, rows)
    (out / f"{name}.md").write_text(_markdown(rows))
    try:
        _chart(out / f"{name}.png", name, rows)
    except ImportError:
        print("chart skipped: install matplotlib for bench/results/*.png", file=sys.stderr)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        keys = [k for k in _TABLE_KEYS if k in row]
        peers = row.get("peers", {})
        header = ["engine", *keys]
        if not lines:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append("| lamina | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        for peer, figures in peers.items():
            cells = [_fmt(figures.get(k, "")) for k in keys]
            lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart(path: Path, name: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if "kernel" in rows[0]:
        labels = [f"{r['kernel']}\n{r['shape']}" for r in rows]
        ax.bar(labels, [r["gbps"] for r in rows])
        ax.axhline(rows[0]["bandwidth_gbps"], color="red", linestyle="--", label="bandwidth")
        ax.set_ylabel("GB/s")
        ax.tick_params(axis="x", labelsize=6)
    elif "perplexity" in rows[0]:
        for kind in dict.fromkeys(r["kind"] for r in rows[1:]):
            points = [rows[0]] + [r for r in rows if r["kind"] == kind]
            ax.plot([r["sparsity"] for r in points], [r["perplexity"] for r in points], "o-",
                    label=kind)  # fmt: skip
        ax.set_xlabel("sparsity")
        ax.set_ylabel("perplexity")
        ax.legend()
    elif "dense_int8_decode_tok_s" in rows[0]:
        names = ("dense_int8", "weight_sparse_50", "activation_sparse_40")
        ax.bar(names, [rows[0][f"{n}_decode_tok_s"] for n in names])
        ax.set_ylabel("decode tok/s")
    elif "streamed_decode_tok_s" in rows[0]:
        names = ("resident", "streamed_cached", "streamed")
        ax.bar(names, [rows[0][f"{n}_decode_tok_s"] for n in names])
        ax.set_ylabel("decode tok/s")
    elif "batch_curve_decode_tok_s" in rows[0]:
        curve = rows[0]["batch_curve_decode_tok_s"]
        ax.plot([int(b) for b in curve], list(curve.values()), marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoding together")
        ax.set_ylabel("aggregate decode tok/s")
    elif "aggregate_tok_s" in rows[0]:
        engines = {"lamina": rows[0], **rows[0].get("peers", {})}
        for i, key in enumerate(("single_tok_s", "aggregate_tok_s")):
            ax.bar([j + 0.4 * i for j in range(len(engines))],
                   [f[key] for f in engines.values()], width=0.4, label=key)  # fmt: skip
        ax.set_xticks([j + 0.2 for j in range(len(engines))], list(engines))
        ax.set_ylabel("generated tok/s")
        ax.legend()
    else:
        row = rows[0]
        engines = {"lamina": row, **row.get("peers", {})}
        ax.bar([f"{e}\ndecode" for e in engines], [f["decode_tok_s"] for f in engines.values()])
        ax.set_ylabel("decode tok/s")
    ax.set_title(name)
    if "kernel" in rows[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
