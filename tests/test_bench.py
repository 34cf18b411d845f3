"""The bench runs end to end and reports every figure it promises (no timing is asserted)."""

from __future__ import annotations

import json

from engine.cli import main

E2E_KEYS = (
    "prefill_tok_s", "decode_tok_s", "ttft_s", "tpot_s", "load_s", "peak_rss_mb",
    "bandwidth_gbps", "bytes_per_token", "warm_start_s", "cold_start_s",
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
