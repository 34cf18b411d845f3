"""Host -> GPU layer streaming (offload.device_stream) on numba's CUDA simulator.

A 4-layer toy model whose GPU budget holds one layer resident streams the other three
through two device buffers, from pinned host RAM or, past the RAM budget, from disk: its
logits equal the fully resident CUDA run's bit for bit and the CPU's closely, its greedy
tokens the CPU's, what the backend allocates on the device stays within the budget, the
copies are counted, and close() releases the buffers. The simulator runs every copy
synchronously when it is queued, so these tests check ordering, contents and accounting,
not overlap or bandwidth. Each simulated pass of the toy takes seconds (every CUDA thread
is a Python thread), so passes are few and prompts short.
"""

from __future__ import annotations

import gc
import json
import re
import threading
import weakref

import numpy as np
import pytest

import kernels_gpu
from engine import LLM
from engine.backends.cuda import CUDABackend
from engine.cli import main
from engine.errors import EngineClosedError, LaminaError
from engine.loader.checkpoint import save_checkpoint
from engine.loader.model_loader import load_model
from offload.device_stream import DeviceLayerStream
from offload.placement import PlacementError, Tier
from offload.streaming import LayerLayout
from tests.cudasim import pooled_blocks
from tests.test_cuda_backend import assert_logits_close, build_toy_llama, warm_step_calls

pytestmark = pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")

LAYERS = 4
PROMPT = [3, 5]
STREAMED = (Tier.DEVICE,) + (Tier.HOST_TO_DEVICE,) * (LAYERS - 1)


@pytest.fixture(scope="module", autouse=True)
def fast_simulator():
    with pooled_blocks():
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_stream") / "toy"
    build_toy_llama(folder, tied=False, seed=2, layers=LAYERS)
    return folder


@pytest.fixture(scope="module")
def resident(toy):
    return LLM(toy, device="cuda", kv_cache_mb=1)


def budget_keeping(resident: LLM, layers: int) -> int:
    """A GPU budget holding `layers` layers resident plus two streaming buffers, read off
    the fully resident plan (same KV cache and activation reserve)."""
    plan = resident.placement
    assert plan.fully_resident and plan.gpu is not None
    return plan.gpu.used - sum(plan.layer_bytes[layers:]) + 2 * max(plan.layer_bytes)


def test_streamed_logits_equal_resident_and_cpu_within_the_budget(toy, resident):
    budget = budget_keeping(resident, 1)
    cpu = LLM(toy, device="cpu", kv_cache_mb=1)
    with LLM(toy, device="cuda", kv_cache_mb=1, gpu_memory=budget) as streamed:
        plan, loop = streamed.placement, streamed.engine_loop
        assert plan.tiers == STREAMED
        stream, size = loop.runner.placement.device_stream, plan.layer_bytes[1]
        # Weights, KV cache and streaming buffers: all the backend put on the device.
        allocated = streamed.backend.allocated_bytes
        assert plan.gpu.non_layer + plan.gpu.buffers + loop.runner.kv_cache_bytes < allocated
        assert allocated <= plan.gpu.used <= budget
        assert stream.device_bytes == plan.device_buffers.total == 2 * size
        assert stream.pinned_bytes == sum(plan.layer_bytes[1:])
        assert stream.stats.copies == 2  # the first two streamed layers, queued at once

        logits = streamed.prompt_logits(PROMPT)
        # One pass: layers 3 and then 1 (for the next pass) were copied in behind compute.
        stats = stream.stats
        assert (stats.copies, stats.sync_copies, stats.bytes_copied) == (4, 0, 4 * size)
        assert stats.copy_s > 0 and 0 <= stats.overlap <= 1
        # The same kernels over the same bytes, only at other addresses: bit-identical.
        np.testing.assert_array_equal(logits, resident.prompt_logits(PROMPT))
        assert_logits_close(logits, cpu.prompt_logits(PROMPT), 3e-6)
        buffer = weakref.ref(stream._slots[0].buffer)
    assert stream.device_bytes == stream.pinned_bytes == 0
    gc.collect()
    assert buffer() is None
    with pytest.raises(EngineClosedError, match="closed"):
        streamed.prompt_logits(PROMPT)


def test_streamed_greedy_tokens_equal_cpu_and_verbose_prints_plan_and_stats(toy, resident, capsys):
    budget = budget_keeping(resident, 1)
    argv = ["generate", "-m", str(toy), "--kv-cache-mb", "1", "--max-tokens", "2"]
    argv += ["--temperature", "0", "--json", "w3 w5"]
    assert main([*argv, "--device", "cpu"]) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*argv, "--device", "cuda", "--gpu-memory", f"{budget}B", "-v"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] == expected
    assert "1 resident on the device (0); 3 streamed host -> device (1-3)" in err
    assert "device streaming buffers: 2 x" in err
    assert re.search(r"copied \d+ layers host -> device, .* overlap \d+%", err)


@pytest.fixture(scope="module")
def toy_int8_checkpoint(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("device_stream") / "int8"
    save_checkpoint(load_model(toy, "int8"), out)
    return out


def test_disk_layers_reach_the_gpu_through_pinned_staging(toy_int8_checkpoint, monkeypatch):
    ck = toy_int8_checkpoint
    full = LLM(ck, device="cuda", kv_cache_mb=1)
    size, before = full.placement.layer_bytes[1], readers()
    streamed = LLM(
        ck,
        device="cuda",
        kv_cache_mb=1,
        gpu_memory=budget_keeping(full, 1),
        cpu_memory=2 * size + 1,  # two staging buffers, no layer kept in RAM
    )
    assert streamed.placement.tiers == (Tier.DEVICE,) + (Tier.DISK,) * (LAYERS - 1)
    assert streamed.placement.host_buffers.count == 2
    logits = streamed.prompt_logits(PROMPT)
    np.testing.assert_array_equal(logits, full.prompt_logits(PROMPT))
    stats = streamed.device_stream_stats
    assert (stats.copies, stats.sync_copies, stats.bytes_copied) == (4, 0, 4 * size)
    # Layers 1-3 were read for the pass (the next pass's layer 1 may still be reading).
    assert streamed.stream_stats.reads >= 3 and streamed.stream_stats.sync_reads == 0
    assert readers() == before + 1
    # The engine's thread waits only for the logits: the uploader thread waits for the disk
    # and for each copy out of a staging buffer before that buffer is refilled.
    assert warm_step_calls(streamed, monkeypatch) == [["wait"]] * 3
    streamed.close()
    assert readers() == before
    assert streamed.engine_loop.runner.placement.device_stream.device_bytes == 0


def readers() -> int:
    """Disk reader threads alive (LayerStream's executor names them)."""
    return sum(t.name.startswith("lamina-stream") for t in threading.enumerate())


def test_gpu_memory_needs_the_cuda_backend(toy, capsys):
    with pytest.raises(LaminaError, match="GPU memory budget applies to device cuda"):
        LLM(toy, device="cpu", gpu_memory="1G")
    argv = ["generate", "-m", str(toy), "--device", "cpu", "--gpu-memory", "1G", "w3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory" in err


def test_budgets_too_small_are_refused_clearly(toy, resident):
    with pytest.raises(PlacementError, match="gpu memory budget"):
        LLM(toy, device="cuda", kv_cache_mb=1, gpu_memory=4096)
    size = resident.placement.layer_bytes[0]
    with pytest.raises(LaminaError, match="only a lamina checkpoint can stream layers from disk"):
        LLM(
            toy,
            device="cuda",
            kv_cache_mb=1,
            gpu_memory=budget_keeping(resident, 0),
            cpu_memory=2 * size + 1,
        )


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_device_stream_in_order_and_random_access(buffers):
    """The buffer ring on its own: passes wrap around, random access copies what it must,
    and a layer is never served from a buffer refilled with another."""
    rng = np.random.default_rng(buffers)
    host = {
        i: {
            "w": rng.standard_normal((3, i + 2)).astype(np.float32),
            "n": np.arange(i, dtype=np.int8),
        }
        for i in range(1, 6)
    }
    backend = CUDABackend()
    pinned = {}
    for i, arrays in host.items():
        layout = LayerLayout.packed(arrays)
        image = backend.pinned_empty(layout.nbytes)
        layout.pack(arrays, image)
        pinned[i] = (image, layout)

    def build(i, arrays):
        return i, {name: array.copy_to_host() for name, array in arrays.items()}

    with DeviceLayerStream(
        6, {0: "resident"}, pinned, None, build, backend.stream, backend.device_empty,
        buffers=buffers,
    ) as stream:  # fmt: skip
        assert stream.device_bytes == buffers * max(lay.nbytes for _, lay in pinned.values())
        for _ in range(3):
            for i in range(1, 6):
                layer = stream.fetch(i)
                assert layer[0] == i
                assert all(np.array_equal(layer[1][k], host[i][k]) for k in host[i])
                stream.release(i)
        # One buffer is the current layer's: nothing can be copied ahead of its use.
        assert (stream.stats.sync_copies == 0) == (buffers > 1)
        for i in (4, 2, 5, 3, 3):
            got = stream.fetch(i)[1]
            assert all(np.array_equal(got[k], host[i][k]) for k in host[i])
            stream.release(i)
        assert stream.fetch(0) == "resident"
        with pytest.raises(IndexError):
            stream.fetch(6)


def test_a_warm_streamed_decode_step_allocates_nothing(toy, resident, monkeypatch):
    """Layers copied in from pinned host memory each step reuse their streaming buffers, and
    the copies are ordered by events: the host waits only for the logits."""
    with LLM(toy, device="cuda", kv_cache_mb=1, gpu_memory=budget_keeping(resident, 1)) as llm:
        assert llm.placement.tiers == STREAMED
        assert warm_step_calls(llm, monkeypatch) == [["wait"]] * 3


def test_streamed_int4_layers_equal_resident_and_allocate_nothing_warm(toy, monkeypatch):
    """Block-format layers (int4) stream as int8 ones do: the layer is rebuilt over its
    device buffer with its format read on the host, and gives the resident bits."""
    resident = LLM(toy, device="cuda", kv_cache_mb=1, quant="int4")
    budget = budget_keeping(resident, 1)
    with LLM(toy, device="cuda", kv_cache_mb=1, quant="int4", gpu_memory=budget) as llm:
        assert llm.placement.tiers == STREAMED
        np.testing.assert_array_equal(llm.prompt_logits(PROMPT), resident.prompt_logits(PROMPT))
        assert warm_step_calls(llm, monkeypatch) == [["wait"]] * 3


def test_the_gpu_device_script_runs_end_to_end_under_the_simulator(toy, tmp_path):
    """bench/gpu_device.py on toy shapes: every section reports its figures (the device run
    of issue 21 is this script; here only its plumbing is checked, not its speed)."""
    from bench.gpu_device import main as gpu_device

    argv = [str(tmp_path), "--skip-tests", "--models", str(toy), "--gemv", "8x32",
            "--probe-mb", "1", "--prompt", "4", "--gen", "3"]  # fmt: skip
    assert gpu_device(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    kinds = ["bandwidth", "gemv", "gemv", "decode", "decode", "streaming"]
    assert [r["kind"] for r in rows] == kinds
    assert all("error" not in r for r in rows), [r.get("traceback") for r in rows]
    assert [r["weights"] for r in rows[1:5]] == ["int8", "int4"] * 2
    for gemv in rows[1:3]:
        assert gemv["share_of_d2d"] > 0
    for decode in rows[3:5]:
        assert decode["decode_tok_s"] > 0 and decode["transformers_bf16"]["decode_tok_s"] > 0
    streamed = rows[5]
    assert streamed["copies"] > 0 and streamed["h2d_gbps"] > 0
    assert streamed["h2d_vs_pinned_probe"] > 0
