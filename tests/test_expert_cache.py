"""A mixture of experts larger than the GPU budget: experts in host memory behind a device
expert cache (offload.expert_cache), on numba's CUDA simulator.

A toy Mixtral (4 layers, 8 experts each, top 2) whose GPU budget holds its layers without
their experts plus a few expert slots: its logits equal the fully resident CUDA run's bit
for bit (the same kernels over the same bytes) and its greedy tokens the CPU's; every expert
run is a hit or a miss of the cache; the dense parts may themselves stream from disk. The
cache on its own: whatever the order of fetches, a fetch returns the expert asked for, and
the most used experts end up resident while rare ones pass through the transient slot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels_gpu
from engine import LLM
from engine.cli import main
from engine.loader.checkpoint import save_checkpoint
from engine.loader.model_loader import load_model
from offload.placement import Tier
from tests.cudasim import pooled_blocks
from tests.test_cuda_backend import build_toy_llama

pytestmark = pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")

LAYERS, EXPERTS = 4, 8
PROMPT = [3, 5, 7]


@pytest.fixture(scope="module", autouse=True)
def fast_simulator():
    with pooled_blocks():
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("expert_cache") / "toy"
    build_toy_llama(folder, tied=False, seed=5, layers=LAYERS, experts=EXPERTS)
    return folder


@pytest.fixture(scope="module")
def resident(toy):
    return LLM(toy, device="cuda", kv_cache_mb=1)


def expert_bytes(llm: LLM) -> tuple[int, int]:
    """(every expert's bytes, one expert's), from the host weights of a CPU-loaded copy."""
    layers = load_model(llm.engine_config.model, llm.engine_config.quant).weights.layers
    one = layers[0].experts.expert_nbytes(0)
    return sum(lay.experts.expert_nbytes(e) for lay in layers for e in range(EXPERTS)), one


def budget_with_slots(resident: LLM, slots: int) -> int:
    """A GPU budget holding the layers without their experts and about `slots` experts."""
    plan = resident.placement
    assert plan.fully_resident and plan.expert_cache is None
    every, one = expert_bytes(resident)
    return plan.gpu.used - every + slots * one


def test_experts_served_by_the_cache_give_the_resident_logits(toy, resident):
    budget = budget_with_slots(resident, 4)
    with LLM(toy, device="cuda", kv_cache_mb=1, gpu_memory=budget) as cached:
        plan = cached.placement
        cache = plan.expert_cache
        assert plan.tiers == (Tier.DEVICE,) * LAYERS  # the layers without their experts
        assert cache is not None and cache.experts == LAYERS * EXPERTS and cache.transient == 1
        assert 1 <= cache.slots < LAYERS * EXPERTS
        assert plan.gpu.expert_cache == cache.total and plan.gpu.used <= budget
        assert cached.backend.allocated_bytes <= plan.gpu.used
        # The experts stay host arrays; the routers moved.
        layer = cached.loaded.weights.layers[1]
        assert isinstance(layer.experts.gate_up[0].data, np.ndarray)
        assert not isinstance(layer.experts.router.data, np.ndarray)
        logits = cached.prompt_logits(PROMPT)
        np.testing.assert_array_equal(logits, resident.prompt_logits(PROMPT))
        stats = cached.expert_cache_stats
        # Each of the 3 tokens runs 2 experts per layer, each expert once over its tokens.
        hits, misses = stats.hits, stats.misses
        assert 2 * LAYERS <= hits + misses <= 2 * LAYERS * len(PROMPT) and misses >= 1
        assert stats.admitted == min(misses, cache.slots)  # from empty, the first misses stay
        np.testing.assert_array_equal(cached.prompt_logits(PROMPT), logits)
        assert stats.hits > hits  # the same experts again: the resident ones hit
    assert cached.engine_loop.runner.placement.expert_cache.device_bytes == 0


def test_int4_experts_served_by_the_cache_give_the_resident_logits(toy):
    """Block-format experts (int4) are copied into the slots array by array, as int8 ones."""
    resident = LLM(toy, device="cuda", kv_cache_mb=1, quant="int4")
    budget = budget_with_slots(resident, 4)
    with LLM(toy, device="cuda", kv_cache_mb=1, quant="int4", gpu_memory=budget) as cached:
        assert cached.placement.expert_cache is not None
        layer = cached.loaded.weights.layers[1]
        assert isinstance(layer.experts.gate_up[0].values, np.ndarray)  # left on the host
        np.testing.assert_array_equal(cached.prompt_logits(PROMPT), resident.prompt_logits(PROMPT))
        assert cached.expert_cache_stats.misses >= 1


def test_greedy_tokens_equal_the_cpu_with_dense_parts_streamed_from_disk(toy, tmp_path, capsys):
    ck = tmp_path / "int8"
    save_checkpoint(load_model(toy, "int8"), ck)
    full = LLM(ck, device="cuda", kv_cache_mb=1)
    # A budget one byte short of the whole model: the layers' parts without their experts
    # (`dense`) are all resident, and the rest goes to expert slots.
    probe = LLM(ck, device="cuda", kv_cache_mb=1, gpu_memory=full.placement.gpu.used - 1)
    plan, slot = probe.placement, probe.placement.expert_cache.slot_bytes
    dense = plan.layer_bytes
    assert plan.fully_resident and slot < min(dense)
    # Layer 0's dense part resident, two streaming buffers, one resident and one transient
    # expert slot: too little for another dense part, as an expert is smaller.
    budget = plan.gpu.non_layer + plan.gpu.reserve + dense[0] + 2 * max(dense) + 2 * slot
    argv = ["generate", "-m", str(ck), "--kv-cache-mb", "1", "--max-tokens", "3"]
    argv += ["--temperature", "0", "--json", "w3 w5 w7"]
    assert main([*argv, "--device", "cpu"]) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    # No layer kept in RAM: the dense parts stream from disk through two staging buffers.
    flags = ["--gpu-memory", f"{budget}B", "--cpu-memory", f"{2 * max(dense) + 1}B", "-v"]
    assert main([*argv, "--device", "cuda", *flags]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] == expected
    assert "1 resident on the device (0); 3 streamed from disk (1-3)" in err
    assert "(without their experts)" in err
    assert "kept on the device by use" in err
    assert "expert cache:" in err and "hit rate" in err


def test_a_model_that_fits_moves_its_experts_whole(resident):
    layer = resident.loaded.weights.layers[0]
    assert not isinstance(layer.experts.gate_up[0].data, np.ndarray)
    assert resident.expert_cache_stats is None


def host_experts(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(count)
    return [
        {
            "gate_up.data": rng.integers(-128, 127, (4, 3), dtype=np.int8),
            "gate_up.scale": rng.standard_normal(4).astype(np.float32),
            "down.data": rng.standard_normal((3, 2)).astype(np.float32),
        }
        for _ in range(count)
    ]


def new_cache(slots: int, transient: int, **kw):
    from engine.backends.cuda import CUDABackend
    from offload.expert_cache import DeviceExpertCache

    backend = CUDABackend()
    return DeviceExpertCache(slots, transient, 256, backend.device_empty, backend.stream, **kw)


def to_host(arrays: dict) -> dict[str, np.ndarray]:
    return {name: array.copy_to_host() for name, array in arrays.items()}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(0, 2),
    st.lists(st.integers(0, 5), min_size=1, max_size=40),
)
def test_a_fetch_returns_the_expert_asked_for(slots, transient, order):
    if slots + transient == 0:
        transient = 1
    experts = host_experts(6)
    owners = [object() for _ in experts]
    cache = new_cache(slots, transient)
    for e in order:
        got = cache.fetch(owners[e], experts[e], to_host)
        assert got.keys() == experts[e].keys()
        assert all(np.array_equal(got[k], experts[e][k]) for k in got)
    held = sum(cache.holds(o) for o in owners)
    assert held <= slots
    assert cache.stats.hits + cache.stats.misses == len(order)
    assert cache.stats.admitted <= cache.stats.misses


def test_hot_experts_stay_resident_and_rare_ones_pass_through():
    experts = host_experts(8)
    owners = [object() for _ in experts]
    cache = new_cache(2, 1)
    for rare in range(2, 8):  # experts 0 and 1 picked by every token, the others once each
        for e in (0, 1, rare):
            cache.fetch(owners[e], experts[e], to_host)
    assert cache.holds(owners[0]) and cache.holds(owners[1])
    assert not any(cache.holds(o) for o in owners[2:])
    assert cache.stats.misses == 2 + 6 and cache.stats.admitted == 2
    # The hot set moves: once counts decay, experts used more often displace the old ones.
    cache = new_cache(2, 1, decay_period=8)
    for _ in range(10):
        for e in (0, 1):
            cache.fetch(owners[e], experts[e], to_host)
    for _ in range(20):
        for e in (4, 5):
            cache.fetch(owners[e], experts[e], to_host)
    assert cache.holds(owners[4]) and cache.holds(owners[5])


def test_closed_cache_refuses_fetches():
    cache = new_cache(1, 0)
    cache.close()
    assert cache.device_bytes == 0
    with pytest.raises(ValueError, match="closed"):
        cache.fetch(object(), host_experts(1)[0], to_host)
