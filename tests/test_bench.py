"""The bench runs end to end and reports every figure it promises (no timing is asserted)."""

from __future__ import annotations

import json

from engine.cli import main

E2E_KEYS = (
    "prefill_tok_s", "decode_tok_s", "ttft_s", "tpot_s", "load_s", "peak_rss_mb",
    "bandwidth_gbps", "bandwidth_1thread_gbps", "bytes_per_token", "warm_start_s", "cold_start_s",
    "overhead_per_token_s", "decode_vs_bandwidth_limit",
)  # fmt: skip


def test_bench_e2e_on_a_random_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["bench", "--model", "random:llama-tiny", "--quant", "int8", "--runs", "1"]
    assert main([*argv, "--prompt-tokens", "16", "--gen-tokens", "4", "--peers", "", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in E2E_KEYS:
        assert result[key] > 0, key
    assert result["quant"] == "int8"
    assert set(result["machine"]) == {"cpu", "isa", "threads", "commit"}
    written = {p.suffix for p in (tmp_path / "results").iterdir()}
    assert {".json", ".md"} <= written


def test_bench_kernels_json_lines(tmp_path, monkeypatch, capsys):
    import bench.kernels

    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(bench.kernels, "SHAPES", [("tiny", 17, 33)])
    assert main(["bench", "kernels", "--runs", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["kernel"] for r in rows} == {"gemv_int8", "gemv_f32"}
    for row in rows:
        assert row["shape"] == "17x33" and row["gbps"] > 0 and row["bandwidth_gbps"] > 0
        assert row["machine"]["isa"] and row["machine"]["threads"] >= 1


def test_bench_batch_reports_curve_prefix_and_job(tmp_path, monkeypatch, capsys):
    import bench.batch

    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(bench.batch, "BATCH_SIZES", (1, 2, 16))
    monkeypatch.setattr(bench.batch, "CURVE_GEN", 3)
    monkeypatch.setattr(bench.batch, "PREFIX_TOKENS", 48)
    monkeypatch.setattr(bench.batch, "JOB_PROMPTS", 4)
    monkeypatch.setattr(bench.batch, "JOB_PROMPT_RANGE", (5, 40))
    monkeypatch.setattr(bench.batch, "JOB_GEN_RANGE", (2, 6))
    argv = ["bench", "--batch", "--model", "random:llama-tiny", "--quant", "int8", "--runs", "1"]
    assert main([*argv, "--kv-cache-dtype", "int8", "--peers", "", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_cache_dtype"] == "int8"
    assert set(result["batch_curve_decode_tok_s"]) == {"1", "2", "16"}
    assert result["batch16_vs_single"] > 0 and result["prefix_ttft_speedup"] > 0
    assert 0 <= result["kv_waste"] < 1
    assert result["job_requests"] == 4 and result["job_generated_tokens"] > 0


def test_bench_serve_reports_aggregate_and_ttft(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["bench", "serve", "--model", "random:llama-tiny", "--quant", "int8", "--runs", "1"]
    assert main([*argv, "--clients", "3", "--gen-tokens", "3", "--peers", "", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["failures"] == 0 and result["min_tokens_per_client"] == 3
    for key in ("single_tok_s", "aggregate_tok_s", "ttft_p50_s", "ttft_p99_s"):
        assert result[key] > 0, key
    assert result["ttft_p50_s"] <= result["ttft_p99_s"]


def test_bandwidth_probe_reads_8x_the_last_level_cache():
    """Checked against the cache sizes lscpu reports (the whole machine's last level)."""
    import shutil
    import subprocess

    import pytest

    from bench.bandwidth import llc_bytes, probe_bytes

    if shutil.which("lscpu") is None:
        pytest.skip("lscpu is not installed")
    out = subprocess.run(
        ["lscpu", "--caches=LEVEL,ALL-SIZE", "--bytes"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("lscpu reports no caches here")
    sizes = [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]
    top = max(int(level) for level, _ in sizes)
    reported = max(int(size) for level, size in sizes if int(level) == top)
    assert llc_bytes() == reported
    assert probe_bytes() >= 8 * reported


def test_llama_bench_json_is_parsed_from_a_recorded_run():
    """A real `llama-bench -m SmolLM2 Q8_0 -t 2 -p 128 -n 64 -r 2 -o json` output (the
    build itself never runs in CI)."""
    from pathlib import Path

    from bench.llama_cpp import parse_llama_bench

    text = (Path(__file__).parent / "data" / "llama_bench_smollm2_q8_0.json").read_text()
    figures = parse_llama_bench(text)
    raw = json.loads(text)
    assert figures["prefill_tok_s"] == raw[0]["avg_ts"] and raw[0]["n_prompt"] == 128
    assert figures["decode_tok_s"] == raw[1]["avg_ts"] and raw[1]["n_gen"] == 64
    assert len(figures["decode_samples_tok_s"]) == 2
    assert figures["weights"].endswith("Q8_0") and figures["threads"] == 2


def test_llama_bench_decode_is_taken_at_the_prompts_depth():
    """llama-bench -d 0,16: prefill from an empty context, decode after 16 tokens (recorded
    output of llama-bench -p 16 -n 8 -d 0,16)."""
    from pathlib import Path

    from bench.llama_cpp import parse_llama_bench

    text = (Path(__file__).parent / "data" / "llama_bench_depth_smollm2_q8_0.json").read_text()
    raw = json.loads(text)
    figures = parse_llama_bench(text, depth=16)
    pp = next(r for r in raw if r["n_prompt"] == 16 and r["n_depth"] == 0)
    tg = next(r for r in raw if r["n_gen"] == 8 and r["n_depth"] == 16)
    assert figures["prefill_tok_s"] == pp["avg_ts"] and figures["decode_tok_s"] == tg["avg_ts"]
    assert figures["decode_depth"] == 16
    assert parse_llama_bench(text)["decode_tok_s"] != figures["decode_tok_s"]  # depth 0's


def test_bench_profile_splits_a_decode_step_by_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["bench", "--profile", "--model", "random:llama-tiny", "--quant", "int8"]
    argv += ["--prompt-tokens", "16", "--gen-tokens", "6", "--sequences", "3", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 3
    ops = {row["op"]: row for row in result["ops"]}
    layers = ops["attention"]["calls_per_step"]
    norm_linears = sum(r["calls_per_step"] for op, r in ops.items() if op.startswith("norm_"))
    assert layers >= 1 and norm_linears == 2 * layers + 1  # the layers' two norms, the final
    assert any(op.startswith("linear_add_ ") and op.endswith("Int8Weight") for op in ops)
    assert "outside kernels" in ops
    assert abs(sum(row["share"] for row in result["ops"]) - 1) < 1e-6


def test_bench_contention_reports_each_thread_count_idle_and_loaded(tmp_path, monkeypatch, capsys):
    import numba

    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMINA_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["bench", "--contention", "--model", "random:llama-tiny", "--quant", "int8"]
    assert main([*argv, "--prompt-tokens", "8", "--gen-tokens", "3", "--runs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cores = numba.config.NUMBA_NUM_THREADS
    assert len(result["rows"]) == 2 * (cores + 1)  # idle and loaded: default, each count
    assert {row["threads"] for row in result["rows"]} == {"default", *range(1, cores + 1)}
    assert all(row["decode_tok_s"] > 0 for row in result["rows"])
    for summary in result["summary"].values():
        assert summary["default_vs_best"] > 0 and 1 <= summary["best_threads"] <= cores
