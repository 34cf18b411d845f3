"""`lamina batch --ray` and `LaminaPredictor` on a local two-node Ray cluster (loopback).

The local batch job is the reference: the same lines give the same OUT records, line by line,
whether run here or by the cluster's actors, through an actor killed mid-job and a driver
killed mid-job.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'lamina[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'lamina[ray]'")

from engine import LLM
from engine.batch_job import run_batch
from engine.cli import main
from engine.distributed import LaminaPredictor
from engine.distributed.ray_job import run_ray_batch
from engine.errors import ModelLoadError
from tests.test_batch_job import CHAT, read_records, write_lines

ENGINE = {"quant": "int8", "max_model_len": 256}
GREEDY = {"max_tokens": 8, "temperature": 0}
TIMINGS = ("ttft_s", "total_s", "tokens_per_s")
FACTS = [
    {"id": i, "prompt": f"Fact {i} about the sea:", "max_tokens": 4 + i % 7} for i in range(36)
]
LINES = [
    *FACTS,
    {"id": "chat", "messages": CHAT},
    {"id": "sampled", "prompt": "Once upon a time", "n": 2, "temperature": 0.8, "seed": 3},
    '{"id": "broken", "prompt": ',  # bad JSON: reported by the driver
    {"id": 3, "prompt": "a repeated id"},  # reported by the driver
    {"id": "typo", "prompt": "a", "temprature": 0.5},  # reported by an actor
    {"id": "long", "prompt": "word " * 400},  # too long for the context: by an actor's engine
]


@pytest.fixture(scope="module")
def cluster():
    """Two single-CPU nodes on loopback, shared by the module's tests."""
    from ray.cluster_utils import Cluster

    store = 150 * 2**20
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store}
    )
    nodes.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def llm():
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)  # the actors' thread count: one CPU per node
    yield LLM(**ENGINE)
    numba.set_num_threads(before)


def local_records(llm: LLM, src: Path, out: Path) -> dict[str, dict]:
    run_batch(llm, src, out, GREEDY, log=io.StringIO())
    return by_line(read_records(out), src)


def by_line(records: list[dict], src: Path) -> dict[str, dict]:
    """Records keyed by their id (error lines by their line), without timings."""
    keyed = {}
    for record in records:
        key = f"line {record['line']}" if "error" in record else json.dumps(record["id"])
        assert key not in keyed, f"{key} twice in OUT"
        keyed[key] = {k: v for k, v in record.items() if k not in TIMINGS}
    return keyed


def test_cluster_job_equals_local_job(cluster, llm, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", *LINES)
    expected = local_records(llm, src, tmp_path / "local.jsonl")
    log = io.StringIO()
    summary = run_ray_batch(src, tmp_path / "out.jsonl", GREEDY, engine_kwargs=ENGINE, log=log)
    got = by_line(read_records(tmp_path / "out.jsonl"), src)
    assert got == expected
    assert (summary.written, summary.failed, summary.exit_code) == (38, 4, 1)
    assert sum(s.lines for s in summary.actors.values()) == 40  # the driver reported 2 itself
    assert all(s.tokens > 0 and s.busy_s > 0 for s in summary.actors.values())
    reports = [line for line in log.getvalue().splitlines() if ".jsonl:" in line]
    assert len(reports) == 4 and any("unknown field(s): temprature" in r for r in reports)
    # A rerun finds every id done.
    again = run_ray_batch(src, tmp_path / "out.jsonl", GREEDY, engine_kwargs=ENGINE, log=log)
    assert (again.written, again.skipped) == (0, 38)


def long_job(tmp_path: Path) -> Path:
    """Four short lines, then twelve long ones: the driver hands out four lines per task, so
    the short ones reach OUT together while the long ones run for many steps."""
    lines = [{"id": i, "prompt": f"Story {i}:", "max_tokens": 4 if i < 4 else 160,
              "ignore_eos": True} for i in range(16)]  # fmt: skip
    return write_lines(tmp_path / "in.jsonl", *lines)


def wait_for_lines(out: Path, done: threading.Event | subprocess.Popen) -> int:
    """Complete lines in OUT, once there is at least one (or the job ended)."""
    while True:
        count = out.read_bytes().count(b"\n") if out.exists() else 0
        ended = done.is_set() if isinstance(done, threading.Event) else done.poll() is not None
        if count or ended:
            return count
        threading.Event().wait(0.05)


def workers() -> list[psutil.Process]:
    """The processes of the job's Ray Data actors."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "MapWorker(MapBatches(_LinePredictor))" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_an_actor_killed_mid_job_loses_nothing(cluster, llm, tmp_path):
    src = long_job(tmp_path)
    expected = local_records(llm, src, tmp_path / "local.jsonl")
    out = tmp_path / "out.jsonl"
    finished = threading.Event()
    result = {}

    def job():
        try:
            result["summary"] = run_ray_batch(src, out, GREEDY, engine_kwargs=ENGINE)
        finally:
            finished.set()

    thread = threading.Thread(target=job)
    thread.start()
    written = wait_for_lines(out, finished)
    assert 0 < written < 16, "the job must still be running when its actor is killed"
    victims = workers()
    assert victims
    os.kill(victims[0].pid, signal.SIGKILL)
    thread.join()
    assert result["summary"].failed == 0
    assert by_line(read_records(out), src) == expected  # every id once, as the local job


def test_a_driver_killed_mid_job_resumes(cluster, llm, tmp_path):
    src = long_job(tmp_path)
    expected = local_records(llm, src, tmp_path / "local.jsonl")
    out = tmp_path / "out.jsonl"
    lamina = Path(sys.executable).parent / "lamina"
    argv = [str(lamina), "batch", "--quant", "int8", "--max-model-len", "256", "--max-tokens",
            "8", "--temperature", "0", "--ray", cluster.address, str(src), str(out)]  # fmt: skip
    driver = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    written = wait_for_lines(out, driver)
    assert 0 < written < 16, "the driver must still be running when it is killed"
    driver.kill()
    driver.wait()
    summary = run_ray_batch(src, out, GREEDY, engine_kwargs=ENGINE, log=io.StringIO())
    assert summary.skipped >= written and summary.failed == 0
    assert by_line(read_records(out), src) == expected  # every id once, as the local job


def test_predictor_in_a_ray_data_pipeline(cluster, llm):
    rows = [
        {"id": "a", "prompt": "The capital of France is", "topic": "geo"},
        {"id": "b", "messages": CHAT, "max_tokens": 4, "topic": "chat"},
        {"id": "c", "prompt": "x", "top_p": 2.0, "topic": "bad"},
    ]
    ds = ray.data.from_items(rows).map_batches(
        LaminaPredictor,
        fn_constructor_kwargs={"defaults": GREEDY, "threads": 1, **ENGINE},
        compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=2),
        num_cpus=1,
        batch_size=2,
    )
    got = {row["id"]: row for row in ds.take_all()}
    from engine import SamplingParams

    a = llm.generate("The capital of France is", SamplingParams(**GREEDY))[0]
    b = llm.chat(CHAT, SamplingParams(max_tokens=4, temperature=0))
    assert (got["a"]["text"], got["a"]["completion_tokens"]) == (a.text, len(a.token_ids))
    assert got["b"]["text"] == b.text and got["b"]["error"] is None
    assert "top_p must be in (0, 1]" in got["c"]["error"] and got["c"]["text"] is None
    assert {row["topic"] for row in got.values()} == {"geo", "chat", "bad"}  # passed through


def test_a_shipped_model_runs_on_nodes_without_its_path(cluster, tmp_path, hf_tokenizer):
    from engine.distributed.shipping import ship_model
    from tests.tiny_models import build_tiny_model

    folder = tmp_path / "tiny"
    build_tiny_model("llama-gqa-untied", folder, hf_tokenizer)
    src = write_lines(tmp_path / "in.jsonl", *({"id": i, "prompt": f"{i} +"} for i in range(4)))
    expected = local_records(LLM(str(folder), **ENGINE), src, tmp_path / "local.jsonl")
    engine = {"model": str(folder), **ENGINE}
    run_ray_batch(src, tmp_path / "out.jsonl", GREEDY, engine_kwargs=engine, ship_model=True,
                  log=io.StringIO())  # fmt: skip
    assert by_line(read_records(tmp_path / "out.jsonl"), src) == expected

    shipped = ship_model(folder)
    folder.rename(tmp_path / "elsewhere")  # no node sees the path any more
    with pytest.raises(ModelLoadError, match="cannot load the model: model not found"):
        run_ray_batch(src, tmp_path / "none.jsonl", GREEDY, engine_kwargs=engine)
    ds = ray.data.from_items([{"id": i, "prompt": f"{i} +"} for i in range(4)]).map_batches(
        LaminaPredictor,
        fn_constructor_kwargs={"shipped": shipped, "defaults": GREEDY, "threads": 1, **ENGINE},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        batch_size=4,
    )
    got = {row["id"]: row["text"] for row in ds.take_all()}
    assert got == {i: expected[str(i)]["text"] for i in range(4)}


def test_cli_ray_flags(cluster, tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "Hi"})
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--actors", "2", str(src), str(out)]) == 2
    assert "--actors needs --ray" in capsys.readouterr().err
    assert main(["batch", "--threads", "2", str(src), str(out), "--ray"]) == 2
    assert "--threads-per-actor instead" in capsys.readouterr().err
    assert main(["batch", "--ship-model", str(src), str(out), "--ray"]) == 2
    assert "--ship-model needs --model PATH" in capsys.readouterr().err
    argv = ["batch", f"--ray={cluster.address}", "--actors", "3", str(src), str(out)]
    assert main(argv) == 2
    assert "does not fit the cluster" in capsys.readouterr().err
    argv = ["batch", "--ray", cluster.address, "--model", str(tmp_path / "missing"),
            "--no-progress", str(src), str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lamina batch: error:") and "cannot load the model" in err
    argv = ["batch", "--ray", cluster.address, "--quant", "int8", "--max-tokens", "4",
            "--no-progress", str(src), str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lamina batch: actor " in err and "1 written" in err
    assert [r["id"] for r in read_records(out)] == [1]
