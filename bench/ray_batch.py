"""`lamina bench --batch --ray`: what Ray costs a batch job, on this one machine.

The same 64 chat prompts (64 tokens each, greedy) as a JSONL job, two ways, taking turns run
by run (medians of `runs`): the local job (`lamina batch`, one LLM on 2 threads, loaded
once) and the Ray job (`lamina batch --ray` on a local cluster of 2 single-CPU nodes: two
actors of 1 thread, each loading the model when the job starts).

- ray_startup_s: the cluster's start (once) and, per run, ray_actor_start_s: from the job's
  start until the actors began generating (Ray Data starting them, the model loads);
- ray_job_s: the rest, from the first line an actor took to the last result in OUT, which
  is what the local job's wall time compares with: ray_overhead = ray_job_s / local_s - 1.
Both OUT files must hold the same records (greedy), checked on every run.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = 64
GEN_TOKENS = 64
NODES = 2


def run_ray_batch_bench(quant: str | None, runs: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from engine import LLM
    from engine.batch_job import run_batch
    from engine.distributed.ray_job import run_ray_batch

    work = Path(tempfile.mkdtemp(prefix="lamina-ray-bench-"))
    src = work / "in.jsonl"
    with src.open("w") as f:
        for i in range(PROMPTS):
            content = f"Write a few sentences about the number {i}."
            line = {"id": i, "messages": [{"role": "user", "content": content}]}
            f.write(json.dumps(line) + "\n")
    defaults = {"max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True}
    engine = {"quant": quant or "int8"}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    startup = time.perf_counter() - started
    llm = LLM(threads=2, **engine)
    times: dict[str, list[float]] = {"local": [], "ray_job": [], "ray_actor_start": []}
    try:
        for run in range(runs + 1):  # the first is a warm-up
            local_out, ray_out = work / f"local{run}.jsonl", work / f"ray{run}.jsonl"
            summary = run_batch(llm, src, local_out, defaults, log=io.StringIO())
            ray_summary = run_ray_batch(
                src, ray_out, defaults, engine_kwargs=engine, log=io.StringIO()
            )
            if _records(local_out) != _records(ray_out):
                raise AssertionError("the Ray job's records differ from the local job's")
            if run:
                busy = max(s.busy_s for s in ray_summary.actors.values())
                times["local"].append(summary.elapsed_s)
                times["ray_job"].append(busy)
                times["ray_actor_start"].append(ray_summary.elapsed_s - busy)
    finally:
        llm.close()
        ray.shutdown()
        cluster.shutdown()
    local, job = statistics.median(times["local"]), statistics.median(times["ray_job"])
    return {
        "kind": "ray_batch", "prompts": PROMPTS, "gen_tokens": GEN_TOKENS, "runs": runs,
        "quant": engine["quant"], "local_threads": 2, "ray_nodes": NODES, "ray_actor_threads": 1,
        "local_s": local, "ray_job_s": job, "ray_overhead": job / local - 1,
        "ray_actor_start_s": statistics.median(times["ray_actor_start"]),
        "ray_startup_s": startup, "local_gen_tok_s": PROMPTS * GEN_TOKENS / local,
        "ray_gen_tok_s": PROMPTS * GEN_TOKENS / job,
    }  # fmt: skip


def _records(path: Path) -> dict[int, tuple]:
    """id -> (text, finish_reason, completion_tokens) of an OUT file."""
    records = (json.loads(line) for line in path.read_text().splitlines())
    return {r["id"]: (r["text"], r["finish_reason"], r["completion_tokens"]) for r in records}
